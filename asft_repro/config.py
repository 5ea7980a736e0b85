"""Structured configs: the schema every composed Hydra config is checked against.

A typo in a key or a value of the wrong type fails at composition; bad values
(kl_coef < 0, an unknown method) fail in ``__post_init__`` with one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from asft_repro.losses import METHODS_WITH_KL, KLDirection, Method

BASE_METHOD = "base"  # evaluate the starting model, no training (Table 1's "Base" row)
TEMPLATES = ("alpaca", "chat")


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the fix."""


@dataclass
class ModelConfig:
    name: str = "tiny"  # short label used in run names and tables
    path: str = "tiny"  # hub id, local folder, or "tiny" (built offline, cached)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: Optional[str] = None  # e.g. sdpa, flash_attention_2
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype={self.dtype!r}: use float32, bfloat16 or float16")


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
            raise ConfigError(f"data.template={self.template!r}: use one of {', '.join(TEMPLATES)}")
        if self.domain not in ("math", "medical"):
            raise ConfigError(f"data.domain={self.domain!r}: use math or medical")
        if self.max_length < 8:
            raise ConfigError(f"data.max_length={self.max_length}: must be at least 8")


@dataclass
class MethodConfig:
    name: str = "asft"  # sft | dft | asft | sft_kl | base
    kl_coef: float = 0.05  # lambda (used by asft and sft_kl)
    kl_direction: str = "forward"  # forward = KL(base || policy); reverse = KL(policy || base)

    def __post_init__(self) -> None:
        valid = [m.value for m in Method] + [BASE_METHOD]
        if self.name not in valid:
            raise ConfigError(f"method.name={self.name!r}: use one of {', '.join(valid)}")
        if self.kl_direction not in [d.value for d in KLDirection]:
            raise ConfigError(f"method.kl_direction={self.kl_direction!r}: use forward or reverse")
        if self.kl_coef < 0:
            raise ConfigError(f"method.kl_coef={self.kl_coef}: must be >= 0")

    @property
    def uses_kl(self) -> bool:
        return self.name != BASE_METHOD and Method(self.name) in METHODS_WITH_KL and self.kl_coef > 0


@dataclass
class TrainConfig:
    learning_rate: float = 2e-5
    num_epochs: float = 3.0
    max_steps: int = -1
    global_batch_size: int = 64  # per_device_batch_size * world_size * grad accumulation
    per_device_batch_size: int = 4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    gradient_checkpointing: bool = False
    seed: int = 42
    logging_steps: int = 1
    save_strategy: str = "epoch"  # epoch | steps | no
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    resume: bool = False  # continue from the run directory's last checkpoint
    log_kl: bool = True  # load the base model to log KL even when the method does not optimise it
    loss_chunk_rows: int = 1024
    report_to: list[str] = field(default_factory=lambda: ["wandb"])
    deepspeed: Optional[str] = None  # path to a DeepSpeed JSON config
    fsdp: str = ""  # e.g. "full_shard auto_wrap"
    fsdp_config: Optional[str] = None
    dataloader_num_workers: int = 0
    save_final_model: bool = True

    def __post_init__(self) -> None:
        if self.global_batch_size % self.per_device_batch_size:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                              f"train.per_device_batch_size={self.per_device_batch_size}")
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate={self.learning_rate}: must be > 0")


@dataclass
class EvalConfig:
    after_train: bool = True
    benchmarks: Optional[list[str]] = None  # null = the domain's benchmarks
    benchmarks_dir: str = "data/benchmarks"
    backend: str = "hf"  # hf | vllm | openai
    mc_mode: str = "loglik"  # loglik (next-token letter) | generate (generate then parse)
    template: Optional[str] = None  # null = data.template
    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    n_samples: int = 1
    seed: int = 0
    batch_size: int = 16
    limit: Optional[int] = None  # score only the first N items of each benchmark
    tensor_parallel_size: int = 1  # vllm
    gpu_memory_utilization: float = 0.85  # vllm
    server_url: str = "http://127.0.0.1:8000/v1"  # openai backend
    server_model: Optional[str] = None  # openai backend; null = model path
    request_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.backend not in ("hf", "vllm", "openai"):
            raise ConfigError(f"eval.backend={self.backend!r}: use hf, vllm or openai")
        if self.mc_mode not in ("loglik", "generate"):
            raise ConfigError(f"eval.mc_mode={self.mc_mode!r}: use loglik or generate")
        if self.n_samples < 1:
            raise ConfigError(f"eval.n_samples={self.n_samples}: must be >= 1")


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
    experiment_name: str = "default"  # run group: outputs/<experiment_name>/<run_name>
    run_name: str = "${run_name:${model.name},${data.name},${data.size},${method.name},${method.kl_coef},${method.kl_direction},${train.seed}}"
    output_dir: str = "outputs/${experiment_name}/${run_name}"


@dataclass
class EvalRunConfig(Config):
    """``python -m eval.run``: the run config plus what to score and where."""

    model_path: Optional[str] = None
    benchmarks: Optional[list[str]] = None
    out_dir: Optional[str] = None


def register_configs() -> None:
    """Register the schema (conf/config.yaml extends it) and the run-name resolver."""
    ConfigStore.instance().store(name="config_schema", node=Config)
    ConfigStore.instance().store(name="eval_run_schema", node=EvalRunConfig)
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)


def run_name(model: str, data: str, size: str, method: str, kl_coef: Any, direction: str, seed: Any) -> str:
    """Readable, unique name from the swept values: tiny-numina_cot-256-asft-kl0.05-s42."""
    tag = method
    if method in ("asft", "sft_kl"):
        tag += f"-kl{kl_coef}" + ("-reverse" if direction == "reverse" else "")
    return f"{model}-{data}-{size}-{tag}-s{seed}"
