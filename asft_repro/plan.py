"""Plan a sweep before submitting it: every job's run directory, status, steps, tokens, per-GPU memory, GPU-hours.

    python -m asft_repro.plan [--gpus 8] [--gpu-mem-gb 80] [--tflops 989] [--mfu 0.35] -- OVERRIDES...
    python -m asft_repro.memcheck [--quick] [--ranks 2]    # the memory formula below against measured peaks

OVERRIDES are exactly those of the sweep (``experiment=table1_math method=sft,dft,asft data.size=10k,30k,100k``,
``hydra/launcher=slurm`` included: its gpus_per_node x nodes then sets the world size). Nothing is trained.
Exit status 1 when a job's memory estimate exceeds the GPU's.

Per-GPU memory (bytes; P parameters, W ranks sharding, B per-device batch, T max length, H hidden, L layers,
V vocabulary, b bytes of the compute dtype):

* policy = weights + gradients + AdamW states = (w + w + 2w) * P / S, with w = 4 (fp32 master weights, also
  under bf16-mixed) or 2 (bf16-true), S = W for fsdp2 / zero3 and 1 for ddp;
* ddp buckets (ddp on W > 1 ranks) = w * P: DDP's gradient buckets, a second copy of the gradients;
* base (ASFT / SFT+KL, or KL logging) = b * P / S;
* gathered units (fsdp2 / zero3, also on one rank) = b * (R + 2 * 2 * P_layer [+ V*H]): the root unit R (embedding
  + LM head, V*H*2, once if tied) stays gathered from forward to backward, plus 2 layers of the policy and of the
  base, P_layer = (P - R) / L [+ the base's LM head, which the fused head gathers whole under fsdp2];
* activations = L * B*T*H * b (layer inputs kept by checkpointing) + 17 * B*T*H * b (one layer recomputed);
  without checkpointing L * 17 * B*T*H * b (Korthikanti et al. 2022, flash attention);
* head = with the fused head (``train.fused_head``, the default; not under zero3): its fp32 chunk buffers
  (4 * rows * V * 4, rows = min(256 MB / (16 V), B*T)) and, where the head computes in bf16 (fsdp2 or bf16-true),
  the fp32 head-weight gradient it accumulates (V*H*4); on the logits path B*T*V * (b + 4 + 4 [+ b]): policy
  logits, their fp32 copy and its gradient [+ base logits];
* optimizer step = max(0, w * P / S - (gathered + activations + head)): foreach AdamW's temporaries, which live
  after backward has freed the rest;
* overhead = 2 GiB (CUDA context, NCCL buffers, allocator).

Under ``peft=lora`` / ``qlora`` (asft_repro/lora.py) the policy is a frozen base plus adapters of A parameters:

* policy+optim = base + 16 * A / S: the frozen base in b bytes per parameter (b * P; qlora: 4-bit NF4 with double
  quantization, 0.516 bytes per parameter, except the embedding and LM head, R, which peft's
  prepare_model_for_kbit_training keeps in fp32: 4 bytes) plus the fp32 adapters,
  their gradients and AdamW states; A = r * L * sum over the target modules of (in + out) features (q/o: H + H,
  k/v: H + kv width, gate/up/down: H + the MLP width; modules of other names are not counted);
* ddp buckets = 4 * A; base = 0: the anchor is the same model with its adapters off (no second copy), so gathered
  units count the policy's 2 layers once, and the fused head keeps no fp32 head-weight gradient (the head is frozen);
* activations, head chunks and overhead as above (the adapters' own [B, T, r] activations are not counted).

``python -m asft_repro.memcheck`` checks this formula against measured peaks (docs/scale.md).

GPU-hours = (6 [4 under peft: no weight gradients] + 2 [recompute] + 2 [base forward]) * P * tokens. Tokens are
counted from the prepared data when it and the model's tokenizer are at hand: every record's real token length
(asft_repro/lengths.py), micro-batches drawn as the Trainer draws them, each padded to its longest record
(``tokens_padded``) or not padded at all (``tokens_padding_free``, ``train.padding_free``); the run's own (``tokens``)
prices the GPU-hours. Otherwise they are records x max_length (an upper bound: real sequences are shorter);
``tokens_from`` says which.
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
from asft_repro.fused_head import auto_chunk_rows, work_buffers
from asft_repro.lengths import data_lengths, run_tokens
from asft_repro.modeling import resolve_path
from asft_repro.paths import CONF_DIR, subset_dir
from asft_repro.rundir import FINAL_DIR, checkpoints, has_weights, read_record
from asft_repro.benchmarks import average_label, domain_benchmarks, members
from asft_repro.paths import benchmark_file
from asft_repro.records import resolve_dir
from asft_repro.stats import DEFAULT_DISCORDANCE, mde_from_discordance
from data_prep.subsets import parse_size

GIB = 1024 ** 3
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # peft=qlora: 4-bit NF4, 8-bit block absmax (64), fp32 per 256 blocks
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
    path = Path(resolve_path(cfg.model)) if cfg.model.path == "tiny" else Path(cfg.model.path)
    if (path / "config.json").exists():
        conf = json.loads((path / "config.json").read_text())
        h, layers, vocab = conf["hidden_size"], conf["num_hidden_layers"], conf["vocab_size"]
        inter = conf.get("intermediate_size", 4 * h)
        heads = conf.get("num_attention_heads", 1)
        kv = conf.get("num_key_value_heads") or heads
        head_dim = conf.get("head_dim") or h // heads
        attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim  # q, o and the (grouped) k, v projections
        tied = bool(conf.get("tie_word_embeddings"))
        params = vocab * h * (1 if tied else 2) + layers * (attention + 3 * h * inter)
        return ModelArch(num_params_b=params / 1e9, hidden_size=h, num_layers=layers, vocab_size=vocab,
                         tie_word_embeddings=tied, intermediate_size=inter, kv_size=kv * head_dim)
    if cfg.model.arch is None or not cfg.model.arch.num_params_b:
        raise ConfigError(f"model {cfg.model.name}: no config.json at {path} and no model.arch in its preset; "
                          f"add arch: {{num_params_b, hidden_size, num_layers, vocab_size}} to conf/model/{cfg.model.name}.yaml")
    return cfg.model.arch


def num_records(cfg: Config) -> int:
    """Records in the prepared subset (its manifest), else the nominal size (10k -> 10000)."""
    d = cfg.data
    folder = Path(d.train_file).parent if d.train_file else subset_dir(d.data_dir, d.name, d.size)
    manifest = folder / "manifest.json"
    if manifest.exists():
        return int(json.loads(manifest.read_text()).get("count") or parse_size(d.size))
    return parse_size(d.size)


def head_bytes(cfg: Config, arch: ModelArch, b: int, with_base: bool) -> float:
    """The LM head's working memory: the fused head's chunks and fp32 weight gradient, or full [B, T, V] logits."""
    t = cfg.train
    if t.fused_head and t.strategy != "zero3":  # the trainer's default path (DeepSpeed falls back to logits)
        buffers = work_buffers(cfg.method.uses_kl or t.log_kl)  # an anchor: resident base, adapter-off pass or cache
        rows = min(t.loss_chunk_rows or auto_chunk_rows(arch.vocab_size, buffers=buffers),
                   t.per_device_batch_size * cfg.data.max_length)
        precision = t.resolved_precision(cfg.model.dtype)
        # the fp32 head-weight gradient is the head's .grad itself when the head computes in fp32 (fp32, or ddp with
        # fp32 master weights); FSDP2's bf16 unsharded head or bf16-true weights take a copy of it
        fp32_head = precision == "fp32" or (t.strategy == "ddp" and not precision.endswith("-true"))
        fp32_head = fp32_head or cfg.peft.enabled  # peft: the head is frozen, no head-weight gradient at all
        return buffers * 4 * rows * arch.vocab_size + (0 if fp32_head else 4 * arch.vocab_size * arch.hidden_size)
    return t.per_device_batch_size * cfg.data.max_length * arch.vocab_size * (b + 4 + 4 + (b if with_base else 0))


# ---- peft (asft_repro/lora.py) ----
def adapter_params(cfg: Config, arch: ModelArch) -> float:
    """LoRA parameters: r * layers * sum of (in + out) features over the target modules (default: every block linear)."""
    h, kv = arch.hidden_size, arch.kv_size or arch.hidden_size
    inter = arch.intermediate_size or max(arch.layer_params - 2 * h * h - 2 * h * kv, 0.0) / (3 * h)
    sizes = {"q_proj": 2 * h, "o_proj": 2 * h, "k_proj": h + kv, "v_proj": h + kv,
             "gate_proj": h + inter, "up_proj": h + inter, "down_proj": h + inter}
    return cfg.peft.r * arch.num_layers * sum(sizes.get(name, 0) for name in (cfg.peft.target_modules or sizes))


def peft_memory(cfg: Config, arch: ModelArch, world: int, parts: dict[str, float], b: int) -> dict[str, float]:
    """``parts`` (full fine-tuning's, bytes) as they are under peft: frozen base + fp32 adapters, no base copy."""
    t = cfg.train
    params = arch.num_params_b * 1e9
    shards = world if t.strategy == "fsdp2" else 1
    root = arch.root_params
    base = NF4_BYTES * (params - root) + 4 * root if cfg.peft.method == "qlora" else b * params  # qlora: fp32 root
    adapters = adapter_params(cfg, arch)
    parts = {**parts, "policy+optim": (base + 16 * adapters) / shards,
             "ddp_buckets": 4 * adapters if t.strategy == "ddp" and world > 1 else 0.0, "base": 0.0,
             "gathered": b * (root + 2 * arch.layer_params) if t.strategy == "fsdp2" else 0.0}
    parts["optimizer_step"] = max(0.0, 4 * adapters / shards - (parts["gathered"] + parts["activations"] + parts["head"]))
    return parts
# ---- end peft ----


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
    root, layer = arch.root_params, arch.layer_params
    sharded = t.strategy in ("fsdp2", "zero3")  # units gathered for compute, also on one rank
    base_head = arch.vocab_size * arch.hidden_size if with_base and t.fused_head and t.strategy == "fsdp2" else 0
    gathered = b * (root + 2 * layer * (2 if with_base else 1) + base_head) if sharded else 0.0
    head = head_bytes(cfg, arch, b, with_base)
    parts = {
        "policy+optim": 4 * w * params / shards,
        "ddp_buckets": w * params if t.strategy == "ddp" and world > 1 else 0.0,
        "base": b * params / shards if with_base else 0.0,
        "gathered": gathered,
        "activations": acts,
        "head": head,
        # the optimizer step runs after backward freed the rest: foreach AdamW's temporaries (w * P / S) count only
        # where they exceed the forward/backward working set
        "optimizer_step": max(0.0, w * params / shards - (gathered + acts + head)),
        "overhead": OVERHEAD_BYTES,
    }
    if cfg.peft.enabled:
        parts = peft_memory(cfg, arch, world, parts, b)
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


_LENGTHS: dict[tuple, Any] = {}  # one tokenising pass per data subset and tokenizer, for every job of a sweep


def job_tokens(cfg: Config, steps: int) -> dict[str, Any]:
    """Tokens the job's forward passes cover, padded and padding-free: from the prepared data's real token lengths
    when it and the tokenizer are at hand (``tokens_from`` = data), else records x max_length (= max_length)."""
    d, t = cfg.data, cfg.train
    key = (d.train_file, d.data_dir, d.name, d.size, d.template, d.max_length, cfg.model.path)
    if key not in _LENGTHS:
        _LENGTHS[key] = data_lengths(d, cfg.model)
    found = _LENGTHS[key]
    if found is None:
        bound = steps * t.global_batch_size * d.max_length
        return {"tokens_padded": bound, "tokens_padding_free": bound, "tokens_from": "max_length"}
    prompt, response, _path = found
    count = run_tokens(prompt + response, t.per_device_batch_size,
                       steps * t.global_batch_size // t.per_device_batch_size, seed=t.seed)
    return {"tokens_padded": count.padded, "tokens_padding_free": count.padding_free, "tokens_from": "data"}


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
    counted = job_tokens(cfg, steps)
    tokens = counted["tokens_padding_free" if t.padding_free else "tokens_padded"]
    mem = memory_gb(cfg, arch, world)
    flops_per_token = ((4 if cfg.peft.enabled else 6) + (2 if t.gradient_checkpointing else 0)
                       + (2 if cfg.method.uses_kl or t.log_kl else 0))
    gpu_hours = flops_per_token * arch.num_params_b * 1e9 * tokens / (hw.tflops * 1e12 * hw.mfu) / 3600
    row.update({"strategy": t.strategy, "steps": steps, "tokens": tokens, **counted,
                **{f"{k}_GB": round(v, 1) for k, v in mem.items() if k != "total"},
                "mem_GB": round(mem["total"], 1), "fits": "yes" if mem["total"] <= hw.gpu_mem_gb else "NO: over budget",
                "GPU_h": round(gpu_hours, 2)})
    return row


# Test sizes as published (used where the prepared benchmark file is not on disk).
PUBLISHED_SIZES = {"math500": 500, "minerva": 272, "olympiadbench": 675, "aime24": 30, "amc23": 40,
                   "mmlu_medical": 1089, "medqa": 1273, "medmcqa": 4183}


def benchmark_size(name: str, benchmarks_dir: str, limit: int | None) -> tuple[int | None, str]:
    """Items the evaluation will score and where the count comes from: the prepared files (each member's first
    ``limit`` rows), else the published size."""
    paths = [benchmark_file(resolve_dir(benchmarks_dir), m) for m in members(name)]
    if all(p.is_file() for p in paths):
        counts = [sum(1 for line in p.read_text(encoding="utf-8").splitlines() if line.strip()) for p in paths]
        return sum(min(c, limit) if limit else c for c in counts), "prepared file"
    n = PUBLISHED_SIZES.get(name)
    return (min(n, limit * len(paths)) if n and limit else n), "published"


def observed_discordance(tables_dir: Path) -> dict[str, float]:
    """benchmark -> median discordance of the acc comparisons in ``<tables_dir>/comparisons.csv`` (none: {})."""
    path = tables_dir / "comparisons.csv"
    if not path.is_file():
        return {}
    rows = pd.read_csv(path)
    rows = rows[(rows["metric"] == "acc") & rows["discordance"].notna()]
    return rows.groupby("benchmark")["discordance"].median().to_dict()


def detectable_effects(evals: list[dict[str, Any]], discordance: float | None = None) -> pd.DataFrame:
    """benchmark -> items -> minimum detectable paired difference (points; 80% power, two-sided 5%) for the
    benchmarks the jobs evaluate, and each domain average; discordance measured by an earlier ``tables`` run of
    the experiment when there is one, else ``discordance`` (default ``stats.DEFAULT_DISCORDANCE``)."""
    rows, seen = [], set()
    for ev in evals:
        names = list(ev["benchmarks"] or domain_benchmarks(ev["domain"]))
        key = (ev["domain"], tuple(names), ev["benchmarks_dir"], ev["limit"])
        if key in seen:
            continue
        seen.add(key)
        measured = {} if discordance is not None else observed_discordance(Path(ev["tables_dir"]))
        sizes = []
        for name in names:
            n, source = benchmark_size(name, ev["benchmarks_dir"], ev["limit"])
            d = measured.get(name, discordance if discordance is not None else DEFAULT_DISCORDANCE)
            sizes.append((n, d))
            rows.append({"domain": ev["domain"], "benchmark": name, "n_items": n, "items from": source,
                         "discordance": d, "MDE_points": 100 * mde_from_discordance([n], d) if n else math.nan})
        if all(n for n, _ in sizes) and set(names) == set(domain_benchmarks(ev["domain"])):
            mde = mde_from_discordance([n for n, _ in sizes], [d for _, d in sizes])
            rows.append({"domain": ev["domain"], "benchmark": average_label(ev["domain"]), "n_items": sum(n for n, _ in sizes),
                         "items from": "", "discordance": math.nan, "MDE_points": 100 * mde})
    return pd.DataFrame(rows)


def plan(overrides: list[str], hw: Hardware) -> pd.DataFrame:
    """One row per job; ``.attrs["evals"]``: each job's eval benchmarks (for ``detectable_effects``)."""
    register_configs()
    rows, evals = [], []
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            for job in expand_sweep(overrides):
                cfg, launcher = compose_job(job)
                rows.append(plan_job(cfg, launcher, hw))
                evals.append({"domain": cfg.data.domain, "benchmarks": cfg.eval.benchmarks, "limit": cfg.eval.limit,
                              "benchmarks_dir": cfg.eval.benchmarks_dir,
                              "tables_dir": str(Path(cfg.output_dir).parent.parent / "tables" / cfg.experiment_name)})
    finally:
        HydraConfig.instance().cfg = None  # leave no job's overrides behind for later composes in this process
    table = pd.DataFrame(rows)
    table.attrs["evals"] = evals
    return table


def token_note(table: pd.DataFrame) -> str:
    """One line: what the tokens (and so the GPU-hours) were counted from, padded against padding-free."""
    trained = table[table["tokens_from"].notna()] if "tokens_from" in table else table[:0]
    if trained.empty:
        return "tokens: none to train"
    sources = sorted(set(trained["tokens_from"]))
    padded, packed = trained["tokens_padded"].sum(), trained["tokens_padding_free"].sum()
    if sources == ["max_length"]:
        return ("tokens: records x data.max_length (no prepared data or tokenizer at hand: an upper bound; run "
                "`python -m data_prep` for real token counts)")
    return (f"tokens: real token lengths of the prepared data ({', '.join(sources)}); padded {padded:,}, padding-free "
            f"{packed:,} ({packed / padded:.0%}); GPU-hours price each job's train.padding_free setting")


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="asft_repro.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=Hardware.gpus, help="ranks per job unless the launcher says")
    parser.add_argument("--gpu-mem-gb", type=float, default=Hardware.gpu_mem_gb)
    parser.add_argument("--tflops", type=float, default=Hardware.tflops, help="peak bf16 TFLOP/s of one GPU")
    parser.add_argument("--mfu", type=float, default=Hardware.mfu)
    parser.add_argument("--discordance", type=float, default=None,
                        help=f"share of items two methods score differently, for the detectable effects (default: "
                             f"measured by an earlier `tables` run of the experiment, else {DEFAULT_DISCORDANCE})")
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
    print(token_note(table))
    effects = detectable_effects(table.attrs.get("evals", []), args.discordance)
    if len(effects):
        print("\nSmallest paired difference between two methods each benchmark can detect (80% power, two-sided 5%):")
        shown = effects.assign(discordance=[f"{d:.2f}" if d == d else "" for d in effects["discordance"]],
                               MDE_points=[f"{m:.1f}" for m in effects["MDE_points"]])
        print(shown.to_markdown(index=False, disable_numparse=True,
                                colalign=("left", "left", "right", "left", "right", "right")))
    over = table[table["fits"] != "yes"]
    if len(over):
        sys.exit(f"asft_repro.plan: {len(over)} job(s) exceed {hw.gpu_mem_gb:.0f} GB per GPU ({', '.join(Path(p).name for p in over['run_dir'])}); "
                 f"use train.strategy=fsdp2, train.gradient_checkpointing=true or a smaller train.per_device_batch_size")


if __name__ == "__main__":
    main()
