"""LoRA / QLoRA (``peft=lora`` / ``peft=qlora``, through the peft library) with the adapter-off model as the anchor.

* :func:`check_peft`: the settings against the model (target modules exist, r, qlora's CUDA + bitsandbytes), before
  anything is written (``asft_repro.train.preflight``).
* :func:`load_kwargs` / :func:`wrap`: the frozen base (bf16 under mixed precision, or 4-bit NF4 for qlora) and the
  PeftModel on it; the adapters train in fp32.
* :func:`adapter_off`: the base distribution pi_base is the same model with its adapters disabled (as TRL's
  trainers' ``null_ref_context``): no second copy of the weights in memory. The fused head then takes the base's
  hidden rows from the adapter-off pass and the (frozen, shared) LM head.
* :func:`save_final`: ``final/`` = the merged model (one Hugging Face folder: eval.run, vLLM and the tables work
  unchanged) and ``final/adapter/`` = the adapter alone (adapter_config.json + weights). Checkpoints hold the
  adapter, optimizer and scheduler (the Trainer's own PeftModel saving and loading).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import dequantize_module_weight
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from asft_repro.config import Config, ConfigError, PeftConfig
from asft_repro.modeling import resolve_path

ADAPTER_DIR = "adapter"  # final/adapter/: the adapter alone, for servers that load adapters


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / DeepSpeed wrappers (FSDP2 shards in place: the PeftModel itself)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def is_peft(model: torch.nn.Module) -> bool:
    return isinstance(unwrap(model), PeftModel)


def block_linear_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the linear layers of the decoder blocks (q_proj, ..., down_proj): not the LM head or embeddings."""
    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not head}
    return sorted(names)


def _skeleton(cfg: Config) -> PreTrainedModel:
    """The model's modules on the meta device (no weights read): for checking target module names."""
    config = AutoConfig.from_pretrained(resolve_path(cfg.model), trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)


def check_peft(cfg: Config) -> None:
    """One ConfigError line for peft settings that cannot train this model here; nothing when peft=none."""
    p = cfg.peft
    if not p.enabled:
        return
    if cfg.train.strategy == "zero3":
        raise ConfigError(f"peft={p.method} runs with train.strategy=ddp (one GPU or DDP) or fsdp2, not zero3; "
                          f"set train.strategy=ddp")
    if p.method == "qlora":
        if not torch.cuda.is_available():
            raise ConfigError("peft=qlora needs a CUDA GPU (bitsandbytes' 4-bit NF4 base); use peft=lora on this machine")
        try:
            import bitsandbytes  # noqa: F401  deferred: an optional dependency (peft=qlora, CUDA only)
        except ImportError:
            raise ConfigError("peft=qlora needs bitsandbytes: pip install 'asft-repro[qlora]' (or use peft=lora)") from None
        if cfg.train.strategy != "ddp":
            raise ConfigError("peft=qlora runs on one GPU or DDP (train.strategy=ddp); for sharding use peft=lora "
                              "with train.strategy=fsdp2")
    if p.target_modules is not None:
        known = block_linear_names(_skeleton(cfg))
        unknown = [m for m in p.target_modules if m not in known]
        if unknown:
            raise ConfigError(f"peft.target_modules: {', '.join(unknown)} is not a linear layer of the decoder blocks of "
                              f"{cfg.model.name} (those are {', '.join(known)}); fix the name, or set null for all of them")


def load_kwargs(p: PeftConfig, base_dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained`` arguments of the frozen base under peft: 4-bit NF4 for qlora (compute in ``base_dtype``)."""
    if p.method != "qlora":
        return {}
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=base_dtype if base_dtype != torch.float32 else torch.bfloat16)}


def lora_config(model: torch.nn.Module, p: PeftConfig) -> LoraConfig:
    return LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules=list(p.target_modules or block_linear_names(model)))


def wrap(model: PreTrainedModel, p: PeftConfig, gradient_checkpointing: bool, seed: int = 0) -> PeftModel:
    """The PeftModel: the base frozen (bf16 / 4-bit), LoRA adapters on ``p``'s target modules in fp32, their random
    initialisation (lora_A) drawn from ``seed`` (train.seed): the same adapters on every rank and in every run."""
    if p.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad-carrying input
    torch.manual_seed(seed)  # the Trainer seeds only after the model exists (it re-seeds with the same train.seed)
    peft_model = get_peft_model(model, lora_config(model, p), autocast_adapter_dtype=True)
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()  # fp32 adapters (and their AdamW states) over a half / 4-bit base
    return peft_model


@contextmanager
def adapter_off(model: torch.nn.Module) -> Iterator[None]:
    """Within: ``model`` (wrapped or not) computes the base distribution, its adapters disabled."""
    with unwrap(model).disable_adapter():
        yield


def merged_state_dict(peft_model: PeftModel, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's state dict with every LoRA delta (scaling * B @ A, in fp32) merged into its weight, under the
    base model's own names; from ``state_dict`` (the PeftModel's, gathered when sharded). 4-bit weights (qlora) are
    de-quantized first (peft's ``dequantize_module_weight``), their quantization state dropped."""
    merged = dict(state_dict)
    for name, module in peft_model.named_modules():
        key = f"{name}.weight"
        if hasattr(getattr(module, "weight", None), "quant_state") and key in merged:  # bitsandbytes 4-bit
            for extra in [k for k in merged if k.startswith(f"{key}.")]:
                merged.pop(extra)
            merged[key] = dequantize_module_weight(module)
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        key = f"{name}.base_layer.weight"
        weight = merged[key]
        for adapter, scale in module.scaling.items():
            a, b = merged.pop(f"{name}.lora_A.{adapter}.weight"), merged.pop(f"{name}.lora_B.{adapter}.weight")
            delta = (b.float() @ a.float()) * scale
            weight = (weight.float() + delta.to(weight.device)).to(weight.dtype)
        merged[key] = weight
    return {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v for k, v in merged.items()}


def save_final(peft_model: PeftModel, state_dict: dict[str, torch.Tensor], folder: str | Path) -> None:
    """Write ``folder`` = the merged model (Hugging Face layout, the base's dtype) and ``folder/adapter/`` = the adapter
    alone (call on rank 0)."""
    folder = Path(folder)
    peft_model.save_pretrained(str(folder / ADAPTER_DIR), state_dict=state_dict)
    merged = merged_state_dict(peft_model, state_dict)
    base = peft_model.get_base_model()
    if hasattr(base.config, "quantization_config"):  # qlora: the merged weights are plain tensors
        del base.config.quantization_config
    base.save_pretrained(str(folder), state_dict=merged)
