"""Structured configs: the schema every composed Hydra config is checked against.

A typo in a key or a value of the wrong type fails at composition; bad values
(kl_coef < 0, an unknown method) fail in ``__post_init__`` with one line.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
import transformers.trainer_utils as trainer_utils
import transformers.training_args as training_args
from omegaconf import OmegaConf

from asft_repro import identity
from asft_repro.errors import ProjectError
from asft_repro.kl_schedule import SCHEDULES
from asft_repro.paper import PAPER_KL_COEF
from asft_repro.prompts import EVAL_TEMPLATES
from asft_repro.methods import METHODS_WITH_KL, KLDirection, Method

BASE_METHOD = "base"  # evaluate the starting model, no training (Table 1's "Base" row)
TEMPLATES = ("alpaca", "chat")
STRATEGIES = ("ddp", "fsdp2", "zero3")  # ddp also covers one process
PRECISIONS = ("auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16-true")
SAVE_STRATEGIES = ("steps", "epoch", "no")


class ConfigError(ProjectError, ValueError):
    """A bad configuration value; the message names the key and the fix."""


@dataclass
class ModelArch:
    """Sizes the memory / cost plan uses when the model's config.json is not on disk."""

    num_params_b: float = 0.0  # parameters, billions
    hidden_size: int = 0
    num_layers: int = 0
    vocab_size: int = 0
    tie_word_embeddings: bool = False  # embedding and LM head share one matrix (FSDP2's root unit holds it once)
    intermediate_size: int = 0  # MLP width (LoRA adapter sizes); 0 = derived from num_params_b
    kv_size: int = 0  # width of the k / v projections (key-value heads x head dim); 0 = hidden_size

    @property
    def root_params(self) -> float:
        """The embedding and the LM head (one matrix when tied): FSDP2's root unit."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def layer_params(self) -> float:
        """One decoder block's parameters: the rest, spread over the layers."""
        return max(self.num_params_b * 1e9 - self.root_params, 0.0) / self.num_layers


@dataclass
class ModelConfig:
    name: str = "tiny"  # short label used in run names and tables
    path: str = "tiny"  # hub id, local folder, or "tiny" (built offline, cached)
    dtype: str = "float32"  # inference dtype (eval, vLLM); training precision is train.precision
    attn_implementation: Optional[str] = None  # e.g. sdpa, flash_attention_2
    trust_remote_code: bool = False
    arch: Optional[ModelArch] = None  # for `python -m asft_repro.plan` (hub models)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype={self.dtype!r} is not known; use float32, bfloat16 or float16")


@dataclass
class DataConfig:
    name: str = "numina_cot"  # a dataset prepared by data_prep (data/<name>/<size>/)
    domain: str = "math"  # math | medical: which benchmarks score it
    size: str = "10k"
    data_dir: str = "data"
    train_file: Optional[str] = None  # explicit JSONL/parquet; overrides data_dir/name/size
    template: str = "alpaca"  # alpaca (the paper's) | chat (the tokenizer's chat template)
    max_length: int = 512

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ConfigError(f"data.template={self.template!r} is not known; use one of {', '.join(TEMPLATES)}")
        if self.domain not in ("math", "medical"):
            raise ConfigError(f"data.domain={self.domain!r} is not known; use math or medical")
        if self.max_length < 8:
            raise ConfigError(f"data.max_length={self.max_length} is too short; set it to at least 8 (the paper uses 512 / 2048)")


@dataclass
class MethodConfig:
    name: str = "asft"  # sft | dft | asft | sft_kl | base
    kl_coef: float = PAPER_KL_COEF  # lambda (used by asft and sft_kl)
    kl_direction: str = "forward"  # forward = KL(base || policy); reverse = KL(policy || base)
    # exact = the resident frozen base model; cache = its top-k distribution read from `python -m asft_repro.anchor`
    anchor: str = "exact"
    anchor_k: int = 128  # top-k of the anchor cache (method.anchor=cache); both are part of the training identity
    # How lambda moves over training (asft_repro/kl_schedule.py); constant = kl_coef throughout (the paper's)
    kl_schedule: str = "constant"  # constant | linear | cosine | adaptive
    kl_coef_end: Optional[float] = None  # linear / cosine: lambda at the last optimizer step
    kl_warmup_steps: int = 0  # linear / cosine: lambda ramps from 0 to kl_coef over these optimizer steps first
    kl_warmup_ratio: float = 0.0  # ... or over this fraction of the optimizer steps
    kl_target: Optional[float] = None  # adaptive: the token-mean KL (nats, optimized direction) lambda steers to
    kl_horizon: float = 10.0  # adaptive: optimizer steps; one step moves lambda by at most 0.2 / kl_horizon (relative)
    kl_coef_min: float = 1e-4  # adaptive: lambda stays in [kl_coef_min, kl_coef_max]
    kl_coef_max: float = 10.0

    def __post_init__(self) -> None:
        valid = [m.value for m in Method] + [BASE_METHOD]
        if self.name not in valid:
            raise ConfigError(f"method.name={self.name!r} is not known; use one of {', '.join(valid)}")
        if self.kl_direction not in [d.value for d in KLDirection]:
            raise ConfigError(f"method.kl_direction={self.kl_direction!r} is not known; use forward or reverse")
        if self.kl_coef < 0:
            raise ConfigError(f"method.kl_coef={self.kl_coef} is invalid; set it to 0 or more")
        if self.anchor not in ("exact", "cache"):
            raise ConfigError(f"method.anchor={self.anchor!r} is not known; use exact (the resident base model) or "
                              f"cache (built by `python -m asft_repro.anchor`)")
        if self.anchor_k < 1:
            raise ConfigError(f"method.anchor_k={self.anchor_k} is invalid; set it to 1 or more (e.g. 128)")
        self._check_schedule()

    def _check_schedule(self) -> None:
        """One line per bad ``kl_schedule`` setting, including settings the chosen schedule would ignore."""
        s = self.kl_schedule
        _check_choice("method.kl_schedule", s, SCHEDULES)
        if s != "constant" and (self.name == BASE_METHOD or Method(self.name) not in METHODS_WITH_KL):
            raise ConfigError(f"method.kl_schedule={s} is invalid with method.name={self.name} (no KL term); "
                              f"use method=asft or sft_kl, or method.kl_schedule=constant")
        if self.kl_coef_end is not None and (s not in ("linear", "cosine") or self.kl_coef_end < 0):
            raise ConfigError(f"method.kl_coef_end={self.kl_coef_end} is invalid with method.kl_schedule={s}; "
                              + ("set it to 0 or more" if s in ("linear", "cosine") else "drop it, or use kl_schedule=linear or cosine"))
        if s in ("linear", "cosine") and self.kl_coef_end is None:
            raise ConfigError(f"method.kl_coef_end=null is invalid with method.kl_schedule={s}; set lambda's end value, e.g. 0.005")
        if self.kl_warmup_steps < 0 or not 0 <= self.kl_warmup_ratio < 1:
            raise ConfigError(f"method.kl_warmup_steps={self.kl_warmup_steps}, method.kl_warmup_ratio={self.kl_warmup_ratio} "
                              f"is invalid; set steps >= 0 or a ratio in [0, 1)")
        if self.kl_warmup_steps and self.kl_warmup_ratio:
            raise ConfigError(f"method.kl_warmup_steps={self.kl_warmup_steps}, method.kl_warmup_ratio={self.kl_warmup_ratio} "
                              f"is invalid; set only one of them")
        if (self.kl_warmup_steps or self.kl_warmup_ratio) and s not in ("linear", "cosine"):
            raise ConfigError(f"method.kl_warmup_steps={self.kl_warmup_steps}, method.kl_warmup_ratio={self.kl_warmup_ratio} "
                              f"is invalid with method.kl_schedule={s}; drop it, or use kl_schedule=linear or cosine")
        if self.kl_target is not None and (self.kl_target <= 0 or s != "adaptive"):
            raise ConfigError(f"method.kl_target={self.kl_target} is invalid with method.kl_schedule={s}; "
                              + ("set a positive KL in nats, e.g. 0.1" if s == "adaptive" else "drop it, or use kl_schedule=adaptive"))
        if s == "adaptive" and self.kl_target is None:
            raise ConfigError("method.kl_target=null is invalid with method.kl_schedule=adaptive; set the KL to hold "
                              "(nats per token, optimized direction), e.g. 0.1")
        if self.kl_horizon <= 0:
            raise ConfigError(f"method.kl_horizon={self.kl_horizon} is invalid; set a positive number of optimizer steps, e.g. 10")
        if s == "adaptive" and not 0 < self.kl_coef_min <= self.kl_coef <= self.kl_coef_max:
            raise ConfigError(f"method.kl_coef={self.kl_coef} is invalid with method.kl_coef_min={self.kl_coef_min}, "
                              f"method.kl_coef_max={self.kl_coef_max}; the adaptive start must lie in the bounds, and "
                              f"0 < kl_coef_min <= kl_coef_max")

    @property
    def uses_kl(self) -> bool:
        """Whether training optimizes a KL term (so it needs the base): lambda above 0 at some step."""
        return (self.name != BASE_METHOD and Method(self.name) in METHODS_WITH_KL
                and (self.kl_coef > 0 or (self.kl_coef_end or 0.0) > 0))


# ---- peft (asft_repro/lora.py) ----------------------------------------------------------------------
PEFT_METHODS = ("none", "lora", "qlora")  # none = full fine-tuning; qlora = LoRA over a 4-bit NF4 base (CUDA)


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning (conf/peft/); the base anchor is then the same model with its adapter off."""

    method: str = "none"  # none | lora | qlora
    r: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA scaling = alpha / r
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None  # null = every linear layer of the decoder blocks (not the LM head)

    def __post_init__(self) -> None:
        _check_choice("peft.method", self.method, PEFT_METHODS)
        if self.r <= 0:
            raise ConfigError(f"peft.r={self.r} is invalid; set a positive LoRA rank, e.g. 8")
        if self.alpha <= 0:
            raise ConfigError(f"peft.alpha={self.alpha} is invalid; set a positive value, e.g. 16 (scaling = alpha / r)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"peft.dropout={self.dropout} is invalid; set a fraction in [0, 1), e.g. 0.05")
        if self.target_modules is not None and not (self.target_modules and all(isinstance(m, str) and m for m in self.target_modules)):
            raise ConfigError(f"peft.target_modules={self.target_modules} is invalid; name modules (e.g. [q_proj,v_proj]) "
                              f"or null for every linear layer of the decoder blocks")

    @property
    def enabled(self) -> bool:
        return self.method != "none"


@dataclass
class TrainConfig:
    learning_rate: float = 2e-5
    num_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides num_epochs
    global_batch_size: int = 64  # per_device_batch_size * world_size * grad accumulation
    per_device_batch_size: int = 4
    lr_scheduler: str = "cosine"  # any transformers SchedulerType
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"  # any transformers OptimizerNames
    strategy: str = "ddp"  # ddp (one process or DDP) | fsdp2 (full_shard) | zero3 (DeepSpeed ZeRO-3)
    precision: str = "auto"  # auto (from model.dtype) | fp32 | bf16-mixed (fp32 master weights) | fp16-mixed | bf16-true
    gradient_checkpointing: bool = False  # activation checkpointing (FSDP2: applied per layer by accelerate)
    seed: int = 42
    logging_steps: int = 1
    save_strategy: str = "epoch"  # epoch | steps | no
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    resume: bool = False  # continue from the run directory's last complete checkpoint
    redo_final: bool = False  # with resume: re-save a final/ whose weights no longer match run.json, from the last checkpoint
    log_kl: bool = True  # load the base model to log KL even when the method does not optimise it
    loss_chunk_rows: Optional[int] = None  # response rows per float32 loss chunk; null = as many as fit in 256 MB
    fused_head: bool = True  # loss from hidden states at response rows, no [B, T, V] logits (Qwen2 / Llama heads)
    padding_free: bool = True  # each micro-batch as one packed row, attention per record (asft_repro/padding_free.py)
    report_to: list[str] = field(default_factory=lambda: ["wandb"])
    deepspeed: Optional[str] = None  # DeepSpeed JSON for strategy=zero3; null = conf/deepspeed/zero3.json
    dataloader_num_workers: int = 0
    save_final_model: bool = True

    def __post_init__(self) -> None:
        for key in ("per_device_batch_size", "global_batch_size", "logging_steps", "save_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} is invalid; set it to 1 or more")
        if self.global_batch_size % self.per_device_batch_size:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                              f"train.per_device_batch_size={self.per_device_batch_size}; change one of them")
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate={self.learning_rate} is invalid; set a positive value, e.g. 2e-5")
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_epochs <= 0):
            raise ConfigError(f"train.num_epochs={self.num_epochs}, train.max_steps={self.max_steps}: nothing to train; "
                              f"set num_epochs > 0 or max_steps > 0 (or method=base to evaluate without training)")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio} is invalid; set a fraction in [0, 1), e.g. 0.1")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ConfigError(f"train.max_grad_norm={self.max_grad_norm}, train.weight_decay={self.weight_decay}: "
                              f"must not be negative; set 0 (no clipping / decay) or more")
        if self.loss_chunk_rows is not None and self.loss_chunk_rows < 1:
            raise ConfigError(f"train.loss_chunk_rows={self.loss_chunk_rows} is invalid; set it to 1 or more")
        _check_choice("train.strategy", self.strategy, STRATEGIES)
        _check_choice("train.precision", self.precision, PRECISIONS)
        _check_choice("train.save_strategy", self.save_strategy, SAVE_STRATEGIES)
        _check_choice("train.lr_scheduler", self.lr_scheduler, _enum_values("SchedulerType"))
        _check_choice("train.optim", self.optim, _enum_values("OptimizerNames"))

    def resolved_precision(self, model_dtype: str) -> str:
        """``precision`` with ``auto`` resolved: half-precision models train mixed, with fp32 master weights."""
        if self.precision != "auto":
            return self.precision
        return {"bfloat16": "bf16-mixed", "float16": "fp16-mixed"}.get(model_dtype, "fp32")


def _check_choice(key: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not known; use one of {', '.join(choices)}")


def _enum_values(name: str) -> list[str]:
    """Values of a transformers enum (SchedulerType, OptimizerNames), for one-line validation."""
    enum = getattr(trainer_utils, name, None) or getattr(training_args, name)
    return [member.value for member in enum]


# The eval keys that decide sampled outputs (part of every eval settings hash; eval.backends.Sampling takes their defaults)
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "n_samples", "seed", "limit")


@dataclass
class EvalConfig:
    after_train: bool = True
    benchmarks: Optional[list[str]] = None  # null = the domain's benchmarks
    benchmarks_dir: str = "data/benchmarks"
    backend: str = "hf"  # hf | vllm | openai
    mc_mode: str = "loglik"  # loglik (next-token letter) | generate (generate then parse) | paper_fallback (the paper's evaluator)
    template: Optional[str] = None  # null = data.template; alpaca_newline = the paper's math eval prompt (asft_repro/prompts.py)
    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    n_samples: int = 1
    seed: int = 0
    stop: Optional[list[str]] = None  # stop strings; null = the paper's (asft_repro.prompts.PAPER_STOP), [] = none
    batch_size: int = 16
    limit: Optional[int] = None  # score only the first N items of each benchmark
    tensor_parallel_size: int = 1  # vllm
    data_parallel_size: int = 1  # eval worker processes, each on its own tensor_parallel_size GPUs; 0 = as many as the visible GPUs allow
    gpu_memory_utilization: Optional[float] = None  # vllm: GPU memory share; on CPU the share of RAM for the KV cache; null = 0.85 on GPU, 0.1 on CPU
    max_model_len: Optional[int] = None  # vllm: context length (prompt + answer); null = the model's own limit
    server_url: str = "http://127.0.0.1:8000/v1"  # openai backend
    server_model: Optional[str] = None  # openai backend; null = model path
    request_timeout: float = 600.0
    request_concurrency: int = 4  # openai backend: requests in flight at once
    request_retries: int = 2  # openai backend: retries of a failed request (connection errors, 408/409/429/5xx)

    def __post_init__(self) -> None:
        if self.backend not in ("hf", "vllm", "openai"):
            raise ConfigError(f"eval.backend={self.backend!r} is not known; use hf, vllm or openai")
        if self.mc_mode not in ("loglik", "generate", "paper_fallback"):
            raise ConfigError(f"eval.mc_mode={self.mc_mode!r} is invalid; use loglik, generate or paper_fallback")
        if self.n_samples < 1:
            raise ConfigError(f"eval.n_samples={self.n_samples} is invalid; set it to 1 or more")
        if self.template is not None and self.template not in EVAL_TEMPLATES:
            raise ConfigError(f"eval.template={self.template!r} is invalid; use {', '.join(EVAL_TEMPLATES)} or null (= data.template)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval.limit={self.limit} is invalid; set 1 or more, or null to score every item")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size={self.batch_size} is invalid; set it to 1 or more")
        if self.max_new_tokens < 1:
            raise ConfigError(f"eval.max_new_tokens={self.max_new_tokens} is invalid; set it to 1 or more")
        if self.temperature < 0:
            raise ConfigError(f"eval.temperature={self.temperature} is invalid; set 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"eval.top_p={self.top_p} is invalid; set it in (0, 1] (1 = no nucleus truncation)")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"eval.tensor_parallel_size={self.tensor_parallel_size} is invalid; set it to 1 or more")
        if self.data_parallel_size < 0:
            raise ConfigError(f"eval.data_parallel_size={self.data_parallel_size} is invalid; set 0 (auto) or more")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"eval.gpu_memory_utilization={self.gpu_memory_utilization} is invalid; set a fraction in (0, 1], "
                              f"or null (0.85 on GPU, 0.1 of RAM on CPU)")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"eval.max_model_len={self.max_model_len} is invalid; set 2 or more, or null for the model's own limit")
        if self.request_concurrency < 1:
            raise ConfigError(f"eval.request_concurrency={self.request_concurrency} is invalid; set it to 1 or more")
        if self.request_retries < 0:
            raise ConfigError(f"eval.request_retries={self.request_retries} is invalid; set 0 (no retry) or more")
        if self.n_samples > 1 and self.temperature == 0:
            raise ConfigError(f"eval.n_samples={self.n_samples} is invalid with eval.temperature=0 (greedy gives "
                              f"{self.n_samples} identical samples); set eval.temperature=1.0 (the paper's) or eval.n_samples=1")
        if self.max_model_len is not None and self.max_new_tokens >= self.max_model_len:
            raise ConfigError(f"eval.max_new_tokens={self.max_new_tokens} is invalid with eval.max_model_len={self.max_model_len} "
                              f"(no room for the prompt); lower eval.max_new_tokens or raise eval.max_model_len")
        if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"eval.stop={self.stop} is invalid; give non-empty strings, [] for none, or null for the paper's")


@dataclass
class AnchorConfig:
    """``python -m asft_repro.anchor``: how the base's top-k cache is built (no run's identity depends on it)."""

    k: Optional[int] = None  # null = method.anchor_k (what a method.anchor=cache run reads)
    batch_size: int = 8  # records per base forward
    records_per_shard: int = 512
    backend: str = "hf"  # hf (transformers) | vllm (prompt log-probs)
    device: Optional[str] = None  # hf: null = cuda when available, else cpu
    dtype: str = "auto"  # auto = the exact anchor's dtype (train.precision's half type; fp32 without mixed precision)
    tensor_parallel_size: int = 1  # vllm

    def __post_init__(self) -> None:
        _check_choice("anchor.backend", self.backend, ("hf", "vllm"))
        _check_choice("anchor.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        for key in ("batch_size", "records_per_shard", "tensor_parallel_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"anchor.{key}={getattr(self, key)} is invalid; set it to 1 or more")
        if self.k is not None and self.k < 1:
            raise ConfigError(f"anchor.k={self.k} is invalid; set it to 1 or more (e.g. 128), or null for method.anchor_k")


@dataclass
class WandbConfig:
    project: str = "asft-repro"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled; WANDB_MODE in the environment wins


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    experiment_name: str = "default"  # run group: outputs/<experiment_name>/<run_name>
    run_name: str = "${run_name:}"  # <cell>[-<swept key_value>...]-<config hash>, see asft_repro/identity.py
    output_dir: str = "outputs/${experiment_name}/${run_name}"


@dataclass
class EvalRunConfig(Config):
    """``python -m eval.run`` (conf/eval_run.yaml): the run config plus what to score and where."""

    model_path: Optional[str] = None  # a checkpoint folder or hub id; null = model.path
    run_dir: Optional[str] = None  # a training run's folder: its config.yaml and run.json's model_path
    benchmarks: Optional[list[str]] = None
    out_dir: Optional[str] = None


@functools.cache
def register_configs() -> None:
    """Register the schema (conf/config.yaml extends it) and the run-name resolver, once per process (storing the
    schema converts the whole dataclass tree, a measurable cost for code that composes many configs)."""
    ConfigStore.instance().store(name="config_schema", node=Config)
    ConfigStore.instance().store(name="eval_run_schema", node=EvalRunConfig)  # conf/eval_run.yaml extends it
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", lambda *, _root_: identity.run_name(_root_))
