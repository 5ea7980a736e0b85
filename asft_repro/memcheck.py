"""The memory plan checked against measurement: ``python -m asft_repro.memcheck [--ranks 2] [--quick]``.

For each small config (hidden size, layers, vocabulary, sequence length, batch; ddp and fsdp2 on ``--ranks``
ranks) a random Qwen2 of that shape is trained for 3 steps through the product's own path (``training_arguments``,
``load_model``, ``ASFTTrainer``: fused head, frozen base sharded like the policy, AdamW) under torchrun, and its
peak memory per rank is compared with :func:`asft_repro.plan.memory_gb` for the same config, without the plan's
CUDA overhead. Peak per rank: on a GPU ``torch.cuda.max_memory_allocated``; on CPU the peak RSS while training
(VmHWM, reset once the model is prepared) minus the RSS before any model was loaded, with glibc told to return
freed blocks (MALLOC_MMAP_THRESHOLD_), so the process's libraries do not count. The table is the largest rank's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback

from asft_repro import distributed
from asft_repro.cli import OneLineParser
from asft_repro.config import register_configs
from asft_repro.data import PadCollator
from asft_repro.losses import IGNORE_INDEX
from asft_repro.modeling import load_model, weight_dtypes
from asft_repro.paths import CONF_DIR
from asft_repro.plan import memory_gb, model_arch
from asft_repro.train import training_arguments
from asft_repro.trainer import ASFTTrainer

GB = 1e9
HEAD_DIM = 64
STEPS = 3
# (hidden, layers, vocab, seq, per-device batch, gradient checkpointing): one knob moves at a time from the first
CONFIGS = [
    (512, 4, 32000, 256, 2, False),
    (1024, 4, 32000, 256, 2, False),
    (512, 12, 32000, 256, 2, False),
    (512, 4, 128000, 256, 2, False),
    (512, 4, 32000, 1024, 2, False),
    (512, 4, 32000, 1024, 2, True),
]
QUICK = [(384, 2, 16000, 128, 2, False)]


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024


def _reset_peak_rss() -> None:
    """Linux: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def model_dir(root: Path, hidden: int, layers: int, vocab: int, seq: int) -> Path:
    """A random-init Qwen2 of this shape (head_dim 64, 4:1 grouped-query attention, MLP 2.7 x hidden), cached."""
    folder = root / f"qwen2-h{hidden}-l{layers}-v{vocab}"
    if not (folder / "config.json").exists():
        heads = hidden // HEAD_DIM
        config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 27 // 10 // 64 * 64,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                             max_position_embeddings=max(seq, 2048), tie_word_embeddings=False)
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


def overrides(folder: Path, seq: int, batch: int, ranks: int, strategy: str, checkpointing: bool, out: Path,
              dtype: str = "float32") -> list[str]:
    return [f"model.path={folder}", "model.name=random", f"model.dtype={dtype}", "method=asft", f"data.max_length={seq}",
            f"train.per_device_batch_size={batch}", f"train.global_batch_size={batch * ranks}", f"train.max_steps={STEPS}",
            f"train.strategy={strategy}", f"train.gradient_checkpointing={str(checkpointing).lower()}",
            "train.report_to=[]", "train.save_strategy=no", "train.save_final_model=false", "eval.after_train=false",
            f"output_dir={out}"]


def compose_config(args: list[str]) -> Any:
    """The run Config of ``args`` (conf/config.yaml plus overrides), as ``python -m asft_repro.train`` composes it."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=args))


def predicted_gb(cfg: Any, ranks: int) -> dict[str, float]:
    """The plan's per-rank memory for ``cfg`` without the CUDA overhead (absent on CPU, not allocated by torch on GPU)."""
    parts = memory_gb(cfg, model_arch(cfg), ranks)
    parts["total"] -= parts.pop("overhead")
    return parts


# ---- one rank (under torchrun) ---------------------------------------------------------------------

def measure_rank(spec: dict[str, Any]) -> dict[str, float]:
    """Train ``STEPS`` steps of the config in ``spec``; this rank's peak memory (GB) over its pre-model state."""
    state = distributed.setup()
    cuda = torch.cuda.is_available()
    cfg = compose_config(spec["overrides"])
    gc.collect()
    before = torch.cuda.memory_allocated() if cuda else _rss_mb() * 2**20
    args = training_arguments(cfg, Path(cfg.output_dir), state.num_processes)
    policy_dtype, base_dtype = weight_dtypes(cfg)
    model = load_model(cfg.model.path, cfg.model, None, dtype=policy_dtype)
    base = load_model(cfg.model.path, cfg.model, None, dtype=base_dtype)
    seq, vocab = cfg.data.max_length, model.config.vocab_size
    prompt = seq // 8  # full-length records, mostly response: the plan's bound (every row a response row)
    generator = torch.Generator().manual_seed(state.process_index)
    records = []
    for _ in range(cfg.train.global_batch_size * STEPS):
        ids = torch.randint(0, vocab, (seq,), generator=generator).tolist()
        records.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    peak: dict[str, float] = {}
    steps: list[float] = []

    class Peak(TrainerCallback):
        def on_train_begin(self, *a: Any, **kw: Any) -> None:  # models prepared (sharded): count training from here
            gc.collect()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            else:
                _reset_peak_rss()

        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            steps.append(-time.perf_counter())

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            steps[-1] += time.perf_counter()

        def on_train_end(self, *a: Any, **kw: Any) -> None:
            peak["bytes"] = torch.cuda.max_memory_allocated() if cuda else _rss_mb("VmHWM") * 2**20

    trainer = ASFTTrainer(model=model, args=args, train_dataset=records, data_collator=PadCollator(0),
                          method=cfg.method, base_model=base, loss_chunk_rows=cfg.train.loss_chunk_rows,
                          fused_head=cfg.train.fused_head, callbacks=[Peak()])
    trainer.train()
    mine = torch.tensor([(peak["bytes"] - before) / GB])
    if state.num_processes > 1:
        torch.distributed.all_reduce(mine, op=torch.distributed.ReduceOp.MAX)
    distributed.teardown()
    step_s = statistics.median(steps[1:] or steps)  # the first step warms up (allocations, kernels)
    return {"measured_gb": mine.item(), "device": "cuda" if cuda else "cpu", "step_s": step_s,
            "tokens_per_step": cfg.train.global_batch_size * seq}


# ---- the table -----------------------------------------------------------------------------------

# what a measuring launch needs besides the product's own settings: one thread per rank, freed blocks returned to
# the system (so peak RSS tracks what training holds), no wandb
LAUNCH_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "WANDB_MODE": "disabled"}


def job_spec(root: Path, config: tuple, strategy: str, ranks: int, folder: Path | None = None,
             dtype: str = "float32") -> dict[str, Any]:
    """What :func:`measure_rank` runs for ``config`` (on ``folder``'s model, else a random one of its shape)."""
    hidden, layers, vocab, seq, batch, checkpointing = config
    folder = folder or model_dir(root, hidden, layers, vocab, seq)
    return {"overrides": overrides(folder, seq, batch, ranks, strategy, checkpointing, root / "out", dtype)}


def table_row(config: tuple, strategy: str, ranks: int, spec: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """The table's row: ``measured`` (rank 0's :func:`measure_rank` result) against the plan for ``spec``."""
    hidden, layers, vocab, seq, batch, checkpointing = config
    plan = predicted_gb(compose_config(spec["overrides"]), ranks)
    return {"hidden": hidden, "layers": layers, "vocab": vocab, "seq": seq, "batch": batch,
            "ckpt": "yes" if checkpointing else "no", "strategy": strategy, "ranks": ranks,
            "predicted_GB": round(plan["total"], 3), "measured_GB": round(measured["measured_gb"], 3),
            "ratio": round(measured["measured_gb"] / plan["total"], 3), "device": measured["device"],
            "plan": {k: round(v, 3) for k, v in plan.items()}, "step_s": measured["step_s"],
            "tokens_per_s": measured["tokens_per_step"] / measured["step_s"]}


def run_config(root: Path, config: tuple, strategy: str, ranks: int, folder: Path | None = None,
               dtype: str = "float32") -> dict[str, Any]:
    """One torchrun launch of ``measure_rank`` (on ``folder``'s model, else a random one of the config's shape);
    the row of the table."""
    spec = job_spec(root, config, strategy, ranks, folder, dtype)
    root.mkdir(parents=True, exist_ok=True)
    spec_file, result_file = root / "spec.json", root / "result.json"
    spec_file.write_text(json.dumps(spec))
    result_file.unlink(missing_ok=True)
    env = {**os.environ, **LAUNCH_ENV}
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    elif ranks < torch.cuda.device_count():  # one rank per visible GPU (distributed.check_launch)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(ranks)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),  # a free port
               "-m", "asft_repro.memcheck", "--child", str(spec_file), "--result", str(result_file)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode or not result_file.exists():
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"measuring {config} {strategy} failed ({tail}); rerun `{' '.join(command)}`")
    return table_row(config, strategy, ranks, spec, json.loads(result_file.read_text()))


def measure(configs: list[tuple], ranks: int = 2, root: Path | None = None) -> list[dict[str, Any]]:
    """The prediction-vs-measurement rows for ``configs`` x (ddp, fsdp2)."""
    root = root or Path(tempfile.mkdtemp(prefix="asft-memcheck-"))
    rows = []
    for config in configs:
        for strategy in ("ddp", "fsdp2"):
            rows.append(run_config(root, config, strategy, ranks))
            print(f"[memcheck] {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in rows[0] if k not in ("plan", "step_s", "tokens_per_s")]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    ratios = [row["ratio"] for row in rows]
    lines.append(f"\nmeasured / predicted: {min(ratios):.2f} to {max(ratios):.2f} over {len(rows)} runs "
                 f"({rows[0]['device']}, {rows[0]['ranks']} ranks)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="asft_repro.memcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one small config (what the test runs)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = measure_rank(json.loads(Path(args.child).read_text()))
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.result).write_text(json.dumps(result))
        return
    print(format_table(measure(QUICK if args.quick else CONFIGS, args.ranks)))


if __name__ == "__main__":
    main()
