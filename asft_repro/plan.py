"""Plan a sweep before submitting it: every job's run directory, status, steps, tokens, per-GPU memory, GPU-hours.

    python -m asft_repro.plan [--gpus 8] [--gpu-mem-gb 80] [--tflops 989] [--mfu 0.35] -- OVERRIDES...

OVERRIDES are exactly those of the sweep (``experiment=table1_math method=sft,dft,asft data.size=10k,30k,100k``,
``hydra/launcher=slurm`` included: its gpus_per_node x nodes then sets the world size). Nothing is trained.
Exit status 1 when a job's memory estimate exceeds the GPU's.

Per-GPU memory (bytes; P parameters, W ranks sharding, B per-device batch, T max length, H hidden, L layers,
V vocabulary, b bytes of the compute dtype):

* policy = weights + gradients + AdamW states = (w + w + 2w) * P / S, with w = 4 (fp32 master weights, also
  under bf16-mixed) or 2 (bf16-true), S = W for fsdp2 / zero3 and 1 for ddp;
* base (ASFT / SFT+KL, or KL logging) = b * P / S;
* gathered units (fsdp2 / zero3) = 2 layers of the policy and of the base at b bytes: 2 * 2 * b * P / L;
* activations = L * B*T*H * b (layer inputs kept by checkpointing) + 17 * B*T*H * b (one layer recomputed);
  without checkpointing L * 17 * B*T*H * b (Korthikanti et al. 2022, flash attention);
* head = with the fused head (``train.fused_head``, the default; not under zero3): its fp32 chunk buffers
  (4 * rows * V * 4, 256 MB by default) and the fp32 head-weight gradient it accumulates (V*H*4); on the logits
  path B*T*V * (b + 4 + 4 [+ b]): policy logits, their fp32 copy and its gradient [+ base logits];
* overhead = 2 GiB (CUDA context, NCCL buffers, allocator).

GPU-hours = (6 + 2 [recompute] + 2 [base forward]) * P * tokens / (peak TFLOP/s * MFU), tokens counted at
max_length (an upper bound: real sequences are shorter).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from asft_repro.cli import OneLineParser
from asft_repro.config import BASE_METHOD, Config, ConfigError, ModelArch, register_configs
from asft_repro.fused_head import WORK_BUFFERS, auto_chunk_rows
from asft_repro.rundir import FINAL_DIR, checkpoints, has_weights, read_record

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
GIB = 1024 ** 3
OVERHEAD_BYTES = 2 * GIB
ACT_BYTES_PER_LAYER = 17  # x B*T*H*b: one layer's working set under flash attention


@dataclass
class Hardware:
    gpus: int = 8
    gpu_mem_gb: float = 80.0
    tflops: float = 989.0  # H100 SXM bf16 dense
    mfu: float = 0.35


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """One override list per job, exactly as Hydra's basic sweeper expands ``a=1,2 b=x,y``."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None) for job in batch]


def compose_job(job: list[str]) -> tuple[Config, dict[str, Any]]:
    """The job's Config (run_name resolved as the real launch resolves it) and its launcher settings."""
    cfg = compose(config_name="config", overrides=job, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True) if "launcher" in cfg.hydra else {}
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_object(cfg), launcher


def model_arch(cfg: Config) -> ModelArch:
    """Sizes from the model's config.json when it is on disk, else from the model preset's ``arch``."""
    from asft_repro.modeling import resolve_path

    path = Path(resolve_path(cfg.model)) if cfg.model.path == "tiny" else Path(cfg.model.path)
    if (path / "config.json").exists():
        conf = json.loads((path / "config.json").read_text())
        h, layers, vocab = conf["hidden_size"], conf["num_hidden_layers"], conf["vocab_size"]
        inter = conf.get("intermediate_size", 4 * h)
        params = vocab * h * (1 if conf.get("tie_word_embeddings") else 2) + layers * (4 * h * h + 3 * h * inter)
        return ModelArch(num_params_b=params / 1e9, hidden_size=h, num_layers=layers, vocab_size=vocab)
    if cfg.model.arch is None or not cfg.model.arch.num_params_b:
        raise ConfigError(f"model {cfg.model.name}: no config.json at {path} and no model.arch in its preset; "
                          f"add arch: {{num_params_b, hidden_size, num_layers, vocab_size}} to conf/model/{cfg.model.name}.yaml")
    return cfg.model.arch


def num_records(cfg: Config) -> int:
    """Records in the prepared subset (its manifest), else the nominal size (10k -> 10000)."""
    from data_prep.subsets import parse_size

    d = cfg.data
    folder = Path(d.train_file).parent if d.train_file else Path(d.data_dir) / d.name / str(d.size)
    manifest = folder / "manifest.json"
    if manifest.exists():
        return int(json.loads(manifest.read_text()).get("count") or parse_size(d.size))
    return parse_size(d.size)


def head_bytes(cfg: Config, arch: ModelArch, b: int, with_base: bool) -> float:
    """The LM head's working memory: the fused head's chunks and fp32 weight gradient, or full [B, T, V] logits."""
    t = cfg.train
    if t.fused_head and t.strategy != "zero3":  # the trainer's default path (DeepSpeed falls back to logits)
        rows = t.loss_chunk_rows or auto_chunk_rows(arch.vocab_size)
        return WORK_BUFFERS * 4 * rows * arch.vocab_size + 4 * arch.vocab_size * arch.hidden_size
    return t.per_device_batch_size * cfg.data.max_length * arch.vocab_size * (b + 4 + 4 + (b if with_base else 0))


def memory_gb(cfg: Config, arch: ModelArch, world: int) -> dict[str, float]:
    """Per-GPU memory by component (GB), following the formula in this module's docstring."""
    t = cfg.train
    precision = t.resolved_precision(cfg.model.dtype)
    b = 4 if precision == "fp32" else 2
    w = 2 if precision.endswith("-true") else 4
    params = arch.num_params_b * 1e9
    shards = world if t.strategy in ("fsdp2", "zero3") else 1
    with_base = (cfg.method.uses_kl or t.log_kl) and cfg.method.anchor != "cache"  # a cached anchor loads no base
    btH = t.per_device_batch_size * cfg.data.max_length * arch.hidden_size
    acts = (arch.num_layers * btH * b + ACT_BYTES_PER_LAYER * btH * b if t.gradient_checkpointing
            else arch.num_layers * ACT_BYTES_PER_LAYER * btH * b)
    parts = {
        "policy+optim": 4 * w * params / shards,
        "base": b * params / shards if with_base else 0.0,
        "gathered": 2 * (2 if with_base else 1) * b * params / arch.num_layers if shards > 1 else 0.0,
        "activations": acts,
        "head": head_bytes(cfg, arch, b, with_base),
        "overhead": OVERHEAD_BYTES,
    }
    gb = {k: v / 1e9 for k, v in parts.items()}
    gb["total"] = sum(gb.values())
    return gb


def run_status(out: Path) -> str:
    record = read_record(out)
    if record.get("train_status") == "complete" and (record.get("method") == BASE_METHOD or has_weights(out / FINAL_DIR)):
        return "done"
    found = checkpoints(out) if out.is_dir() else []
    if found:
        return f"partial (step {found[0].name.split('-')[-1]})"
    return "partial" if record else "new"


def plan_job(cfg: Config, launcher: dict[str, Any], hw: Hardware) -> dict[str, Any]:
    world = (launcher.get("gpus_per_node") or launcher.get("tasks_per_node") or 1) * launcher.get("nodes", 1) \
        if launcher.get("gpus_per_node") else hw.gpus
    row: dict[str, Any] = {"run_dir": cfg.output_dir, "status": run_status(Path(cfg.output_dir)), "ranks": world}
    if cfg.method.name == BASE_METHOD:
        return {**row, "steps": 0, "tokens": 0, "mem_GB": 0.0, "fits": "yes", "GPU_h": 0.0}
    arch = model_arch(cfg)
    records = num_records(cfg)
    t = cfg.train
    steps = t.max_steps if t.max_steps > 0 else math.ceil(math.ceil(records / t.global_batch_size) * t.num_epochs)
    tokens = steps * t.global_batch_size * cfg.data.max_length
    mem = memory_gb(cfg, arch, world)
    flops_per_token = (6 + (2 if t.gradient_checkpointing else 0) + (2 if cfg.method.uses_kl or t.log_kl else 0))
    gpu_hours = flops_per_token * arch.num_params_b * 1e9 * tokens / (hw.tflops * 1e12 * hw.mfu) / 3600
    row.update({"strategy": t.strategy, "steps": steps, "tokens": tokens,
                **{f"{k}_GB": round(v, 1) for k, v in mem.items() if k != "total"},
                "mem_GB": round(mem["total"], 1), "fits": "yes" if mem["total"] <= hw.gpu_mem_gb else "NO: over budget",
                "GPU_h": round(gpu_hours, 2)})
    return row


def plan(overrides: list[str], hw: Hardware) -> pd.DataFrame:
    register_configs()
    rows = []
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            for job in expand_sweep(overrides):
                cfg, launcher = compose_job(job)
                rows.append(plan_job(cfg, launcher, hw))
    finally:
        HydraConfig.instance().cfg = None  # leave no job's overrides behind for later composes in this process
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="asft_repro.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=Hardware.gpus, help="ranks per job unless the launcher says")
    parser.add_argument("--gpu-mem-gb", type=float, default=Hardware.gpu_mem_gb)
    parser.add_argument("--tflops", type=float, default=Hardware.tflops, help="peak bf16 TFLOP/s of one GPU")
    parser.add_argument("--mfu", type=float, default=Hardware.mfu)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    hw = Hardware(args.gpus, args.gpu_mem_gb, args.tflops, args.mfu)
    try:
        table = plan(args.overrides, hw)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        sys.exit(f"asft_repro.plan: {err}")
    shown = table.assign(run_dir=table["run_dir"].map(lambda p: Path(p).name))
    print(shown.to_markdown(index=False, floatfmt=".1f"))
    print(f"\n{len(table)} jobs, {table['GPU_h'].sum():.1f} GPU-hours at {hw.mfu:.0%} MFU of {hw.tflops:.0f} TFLOP/s; "
          f"memory per GPU against {hw.gpu_mem_gb:.0f} GB (formula: python -m asft_repro.plan --help)")
    over = table[table["fits"] != "yes"]
    if len(over):
        sys.exit(f"asft_repro.plan: {len(over)} job(s) exceed {hw.gpu_mem_gb:.0f} GB per GPU ({', '.join(Path(p).name for p in over['run_dir'])}); "
                 f"use train.strategy=fsdp2, train.gradient_checkpointing=true or a smaller train.per_device_batch_size")


if __name__ == "__main__":
    main()
