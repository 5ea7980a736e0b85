"""Load the policy / frozen base model and tokenizer (hub id, local folder or the tiny model)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from asft_repro.config import Config, ConfigError, ModelConfig
from asft_repro.tiny_model import ensure_tiny_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # model.dtype's names
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # train.precision's prefixes
PAD_TOKEN = "[PAD]"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def weight_dtypes(cfg: Config) -> tuple[torch.dtype, torch.dtype]:
    """(policy, frozen base) dtypes: mixed precision keeps fp32 master weights; the base needs none."""
    precision = cfg.train.resolved_precision(cfg.model.dtype)
    half = DTYPES[PRECISION_DTYPES[precision.split("-")[0]]]
    return (half if precision.endswith("-true") else torch.float32), half


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return next(name for name, value in DTYPES.items() if value == dtype)


def resolve_path(cfg: ModelConfig) -> str:
    return str(ensure_tiny_model()) if cfg.path == "tiny" else cfg.path


def _where(path: str) -> str:
    if Path(path).is_dir():
        return f"the folder {path}"
    if path.startswith((".", "/", "~")) or Path(path).suffix:
        return f"{path}, which does not exist"
    return f"the hub id {path}, which is not in the local cache" + (" (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") else "")


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """Tokenizer with a pad token; adds [PAD] when the model has none (as the reference code does)."""
    if Path(path).is_dir() and not any((Path(path) / name).exists() for name in TOKENIZER_FILES):
        raise ConfigError(f"model.path={path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy them from "
                          f"the base model into it (a checkpoint saved by asft_repro.train has them)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        if Path(path).is_dir() and (Path(path) / "config.json").exists():
            raise ConfigError(f"model.path={path} has no usable tokenizer ({type(err).__name__}); copy tokenizer.json and "
                              f"tokenizer_config.json from the base model into it") from None
        raise ConfigError(f"model.path: cannot load {_where(path)}; download it first (huggingface-cli download) and "
                          f"point model.path at the folder, or fix the path") from None
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "right"
    return tokenizer


def check_model_config(path: str, trust_remote_code: bool = False) -> None:
    """The model's config.json is readable (cheap: no weights), else one line naming the fix."""
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path: cannot load a model config from {_where(path)} ({str(err).splitlines()[0][:160]}); "
                          f"point model.path at a model folder or a cached hub id") from None


def load_model(path: str, cfg: ModelConfig, tokenizer: Any | None = None, dtype: torch.dtype | None = None,
               **extra: Any) -> PreTrainedModel:
    """Causal LM in ``dtype`` (default ``cfg.dtype``); embeddings grow (mean-initialised) if the tokenizer did.
    ``extra``: more ``from_pretrained`` arguments (peft=qlora's quantization_config, asft_repro.lora.load_kwargs)."""
    kwargs: dict[str, Any] = {"dtype": dtype or DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code, **extra}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path: cannot load a causal LM from {_where(path)} ({str(err).splitlines()[0][:160]}); "
                          f"point model.path at a model folder or a cached hub id") from None
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model
