"""``make gpu-check``: accept a CUDA machine for the paper runs, offline (nothing downloaded; ~6 min on one H200 + the bench).

    python -m asft_repro.gpu_check [--out outputs/gpu_check] [--layers 2] [--checks fsdp2_1gpu,lora]

The model is a random-init Qwen2 with Qwen2.5-7B's layer shape (hidden 3584, MLP 18944, 28 heads, 4 KV heads) and
its vocabulary (152064), ``--layers`` layers, saved with ``save_pretrained`` beside the tiny ByteLevel tokenizer
padded to that vocabulary (every id decodes, so vLLM can sample any of them); the data are the fixture subsets.
Checks, each a row of ``<out>/summary.json`` and ``<out>/summary.md`` (exit 1 when one fails):

* ``fused_vs_logits``: ASFT loss and gradients of the fused head equal the full-logits path (fp32, TF32 off);
* ``fsdp2_1gpu`` / ``fsdp2_all_gpus``: ``torchrun`` + ``train.strategy=fsdp2``, bf16-mixed, 4 steps, final/ (the
  all-GPU run is skipped on a one-GPU machine; its weights are compared with the 1-GPU run's);
* ``kill_resume``: the widest run again with sharded checkpoints every 2 steps, SIGKILLed once checkpoint-2 is
  complete (one DCP shard per rank), resumed: final/ equals the uninterrupted run's (its checkpoints, ~12 bytes per
  parameter, are then deleted: the disk holds one at a time);
* ``eval``: final/ scored by ``eval.run`` with vLLM when it imports, else transformers (2 items per benchmark);
* ``anchor_vllm``: ``python -m asft_repro.anchor anchor.backend=vllm`` (skipped without vLLM);
* ``memory_speed``: one fsdp2 step at the paper shape (4 x 2048 tokens per GPU, activation checkpointing) on 1 and
  on all GPUs: ``torch.cuda.max_memory_allocated`` against the plan's formula, tokens/s and MFU;
* ``lora``: ``peft=lora`` ASFT on one GPU (and ``peft=qlora`` when bitsandbytes is installed), final/ + adapter/;
* ``bench``: ``python -m asft_repro.bench`` on CUDA (its max_memory_allocated ratios, the LoRA lines among them).

``--checks`` runs some of them (with ``model``, ``data`` and the runs they compare against); the summary is rewritten
after every check, so a machine taken back mid-way still leaves the rows it finished.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from asft_repro.cli import OneLineParser
from asft_repro.fused_head import FusedLoss, enable_fused_head, response_hidden
from asft_repro.losses import IGNORE_INDEX, compute_loss
from asft_repro.memcheck import run_config
from asft_repro.paths import REPO_ROOT
from asft_repro.rundir import checkpoint_problem
from asft_repro.tiny_model import CHAT_TEMPLATE, build_tokenizer, corpus_texts

PROG = "asft_repro.gpu_check"
PAPER_SHAPE = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                   vocab_size=152064, max_position_embeddings=4096)
SMOKE_SHAPE = dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=1,
                   vocab_size=8192, max_position_embeddings=1024)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "B200": 2250.0}
TRAIN_STEPS = 4
MODEL_FLOPS = 8  # x matmul parameters per token: policy forward + backward (6), base forward (2); recompute not counted


@dataclass
class Check:
    """One row of the summary."""

    name: str
    status: str  # pass | fail | skip
    detail: str
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    out: Path
    shape: dict[str, Any]
    layers: int
    gpus: int
    seq: int = 2048
    folder: Path | None = None
    data: Path | None = None
    runs: dict[str, Path] = field(default_factory=dict)
    smoke: bool = False

    @property
    def dtype(self) -> str:
        """bf16 (mixed: fp32 master weights) on GPUs; the CPU smoke run trains fp32 (transformers refuses bf16 there)."""
        return "float32" if self.smoke else "bfloat16"


# ---- the model and the data ----------------------------------------------------------------------

def padded_tokenizer(vocab_size: int) -> Any:
    """The tiny ByteLevel BPE tokenizer, its vocabulary padded with ``<N>`` tokens to ``vocab_size`` ids."""
    spec = json.loads(build_tokenizer(corpus_texts()).backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    i = 0
    while len(vocab) < vocab_size:
        if f"<{i}>" not in vocab:
            vocab[f"<{i}>"] = len(vocab)
        i += 1
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", bos_token=None, unk_token=None)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(ctx: Context) -> Check:
    folder = ctx.out / "model"
    tokenizer = padded_tokenizer(ctx.shape["vocab_size"])
    if not (folder / "config.json").exists():
        config = Qwen2Config(**ctx.shape, num_hidden_layers=ctx.layers, tie_word_embeddings=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen2ForCausalLM(config).to(torch.bfloat16)
        tmp = folder.with_name("model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)
        del model
    ctx.folder = folder
    params = sum(p.numel() for p in _meta_model(folder).parameters())
    return Check("model", "pass", f"random Qwen2, hidden {ctx.shape['hidden_size']}, {ctx.layers} layers, vocabulary "
                 f"{ctx.shape['vocab_size']} ({params / 1e9:.2f} B parameters), tokenizer padded to {len(tokenizer)}",
                 data={"params": params, "folder": str(folder)})


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token: all but an untied input embedding (a lookup, no FLOPs)."""
    total = sum(p.numel() for p in model.parameters())
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total if embedding is head else total - embedding.numel()


def _meta_model(folder: Path) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))


def prepare_data(ctx: Context) -> Check:
    ctx.data = ctx.out / "data"
    done = _run([sys.executable, "-m", "data_prep", f"local_dir={REPO_ROOT / 'data_prep' / 'fixtures'}",
                 f"out_dir={ctx.data}", "sizes=[256]"], timeout=300)
    return Check("data", "pass", f"fixture subsets and benchmarks in {ctx.data}") if done.returncode == 0 else \
        Check("data", "fail", _last_line(done))


# ---- the checks ----------------------------------------------------------------------------------

def fused_vs_logits(ctx: Context) -> Check:
    """ASFT on one batch: the fused head's loss and gradients against the full-logits loss (fp32, TF32 off)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    policy = AutoModelForCausalLM.from_pretrained(ctx.folder, dtype=torch.float32).to(device)
    base = AutoModelForCausalLM.from_pretrained(ctx.folder, dtype=torch.float32).to(device).eval().requires_grad_(False)
    with torch.no_grad():  # a policy that has moved away from the base: the KL term is not zero
        policy.lm_head.weight.add_(0.02 * torch.randn_like(policy.lm_head.weight))
    ids = torch.randint(0, ctx.shape["vocab_size"], (2, 256), generator=torch.Generator().manual_seed(0)).to(device)
    labels = ids.clone()
    labels[:, :128] = IGNORE_INDEX
    watched = ["lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"]

    def grads() -> dict[str, torch.Tensor]:
        out = {n: p.grad.detach().float().clone() for n, p in policy.named_parameters() if n in watched}
        policy.zero_grad(set_to_none=True)
        return out

    logits_loss = compute_loss(policy(input_ids=ids).logits, labels, "asft", base_logits=base(input_ids=ids).logits)[0]
    logits_loss.backward()
    want = grads()
    enable_fused_head(policy)
    with torch.no_grad():
        base_hidden = response_hidden(base, ids, None, labels)
    rows, _stats = policy(input_ids=ids, from_hidden=FusedLoss(labels, "asft", base_hidden, base.lm_head))
    fused_loss = rows.sum() / rows.numel()
    fused_loss.backward()
    got = grads()
    loss_err = abs(fused_loss.item() - logits_loss.item()) / abs(logits_loss.item())
    grad_err = max(((got[n] - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-30)).item() for n in want)
    ok = loss_err < 1e-5 and grad_err < 1e-3
    return Check("fused_vs_logits", "pass" if ok else "fail",
                 f"ASFT loss relative error {loss_err:.1e}, gradient {grad_err:.1e} (max over {len(want)} tensors)",
                 data={"loss_rel_err": loss_err, "grad_rel_err": grad_err})


def train_overrides(ctx: Context, out: Path, *extra: str, strategy: str = "fsdp2", ranks: int | None = None) -> list[str]:
    """The runs' config: bf16-mixed fsdp2, 4 steps of 4 records per GPU (all GPUs, or ``ranks``), final/ only
    (checkpoints: ``kill_resume``)."""
    return [f"model.path={ctx.folder}", "model.name=qwen7b_shape", f"model.dtype={ctx.dtype}", "data=demo_math",
            f"data.data_dir={ctx.data}", "data.size=256", "data.max_length=512", f"train.strategy={strategy}",
            f"train.max_steps={TRAIN_STEPS}", f"train.global_batch_size={4 * (ranks or ctx.gpus)}",
            "train.per_device_batch_size=4",
            "train.learning_rate=1e-5", "train.save_strategy=no", "train.report_to=[]", "eval.after_train=false",
            "experiment_name=gpu_check", f"output_dir={out}", *extra]


def torchrun_command(ranks: int, module: str, args: list[str]) -> list[str]:
    # --standalone: a free port of its own, so no other job's torchrun on the default port gets in the way
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "-m", module,
            *args]


def torchrun(ranks: int, module: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node ranks -m module args`` on the first ``ranks`` GPUs (one rank per visible GPU)."""
    return _run(torchrun_command(ranks, module, args), timeout=timeout, env=first_gpus(ranks))


def first_gpus(ranks: int) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for ``ranks`` ranks on a machine with more GPUs (distributed.check_launch wants one
    rank per visible GPU); nothing to set otherwise."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(ranks)))} if 0 < ranks < count else {}


def fsdp2_run(ctx: Context, ranks: int, name: str) -> Check:
    out = ctx.out / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    done = torchrun(ranks, "asft_repro.train", train_overrides(ctx, out), timeout=420)
    seconds = time.perf_counter() - start
    if done.returncode:
        return Check(name, "fail", _last_line(done))
    ctx.runs[name] = out
    record = json.loads((out / "run.json").read_text())
    ok = record.get("train_status") == "complete" and (out / "final" / "config.json").exists()
    precision = "bf16-mixed" if ctx.dtype == "bfloat16" else "fp32"
    return Check(name, "pass" if ok else "fail", f"{ranks} rank(s), {TRAIN_STEPS} {precision} steps in {seconds:.0f} s "
                 f"(process start included); final/ published", data={"ranks": ranks, "seconds": seconds})


def one_gpu(ctx: Context) -> Check:
    return fsdp2_run(ctx, 1, "fsdp2_1gpu")


def all_gpus(ctx: Context) -> Check:
    if ctx.gpus < 2:
        return Check("fsdp2_all_gpus", "skip", "one GPU visible: the 1-GPU run is the all-GPU run")
    check = fsdp2_run(ctx, ctx.gpus, "fsdp2_all_gpus")
    if check.status == "pass" and "fsdp2_1gpu" in ctx.runs:
        diff = _max_diff(ctx.runs["fsdp2_1gpu"] / "final", ctx.runs["fsdp2_all_gpus"] / "final")
        check.detail += f"; final weights vs the 1-GPU run (same global batch): max |diff| {diff:.1e}"
        check.data["max_diff_vs_1gpu"] = diff
    return check


def kill_resume(ctx: Context) -> Check:
    """The widest run again with sharded checkpoints every 2 steps, SIGKILLed (every rank) once checkpoint-2 is
    complete, then resumed without further checkpoints: its final/ must equal the uninterrupted run's."""
    ranks = ctx.gpus if ctx.gpus > 1 else 1
    reference = ctx.runs.get("fsdp2_all_gpus" if ranks > 1 else "fsdp2_1gpu")
    if reference is None:
        return Check("kill_resume", "skip", "no uninterrupted fsdp2 run to compare with")
    out = ctx.out / "runs" / "killed"
    shutil.rmtree(out, ignore_errors=True)
    checkpoints = ["train.save_strategy=steps", "train.save_steps=2", "train.save_total_limit=1"]
    marker = out / "checkpoint-2" / "trainer_state.json"  # written by rank 0 after every rank's shard
    ended = _run_until(torchrun_command(ranks, "asft_repro.train", train_overrides(ctx, out, *checkpoints)), marker,
                       timeout=420, env=first_gpus(ranks), log=ctx.out / "killed.log")
    if ended != "killed":
        return Check("kill_resume", "fail", f"the run {ended} before its step-2 checkpoint could be killed; see "
                     f"{ctx.out / 'killed.log'}")
    problem = checkpoint_problem(out / "checkpoint-2")
    shards = sorted(p.name for p in (out / "checkpoint-2" / "pytorch_model_fsdp_0").glob("__*_0.distcp"))
    kept = marker.stat().st_mtime_ns
    # the schedule does not depend on checkpointing (not part of the run's identity): resume without more of them
    done = torchrun(ranks, "asft_repro.train", train_overrides(ctx, out, "train.resume=true"), timeout=420)
    if done.returncode:
        return Check("kill_resume", "fail", _last_line(done))
    resumed = marker.exists() and marker.stat().st_mtime_ns == kept  # a restart from step 0 would rewrite it
    diff = _max_diff(reference / "final", out / "final")
    for folder in [*out.glob("checkpoint-*"), *out.glob("incomplete-*")]:  # ~12 bytes per parameter: free the disk
        shutil.rmtree(folder, ignore_errors=True)
    ok = problem is None and len(shards) == ranks and resumed and diff <= 1e-5
    return Check("kill_resume", "pass" if ok else "fail",
                 f"SIGKILL after checkpoint-2 ({len(shards)} rank shard(s), {problem or 'complete'}), resumed on "
                 f"{ranks} rank(s) from it: final weights vs the uninterrupted run max |diff| {diff:.1e} (bound 1e-5)",
                 data={"max_diff": diff, "resumed_from_checkpoint": resumed, "shards": shards})


def evaluate(ctx: Context) -> Check:
    run = ctx.runs.get("fsdp2_all_gpus") or ctx.runs.get("fsdp2_1gpu")
    if run is None:
        return Check("eval", "skip", "no final/ to evaluate")
    backend = "vllm" if _imports("vllm") else "hf"
    args = [sys.executable, "-m", "eval.run", f"run_dir={run}", f"eval.backend={backend}", "eval.limit=2",
            "eval.max_new_tokens=16", f"eval.benchmarks_dir={ctx.data / 'benchmarks'}", "eval.max_model_len=2048"]
    done = _run(args, timeout=600)
    if done.returncode:
        return Check("eval", "fail", f"{backend}: {_last_line(done)}")
    metrics = sorted((run / "eval").rglob("metrics.json"))
    return Check("eval", "pass" if metrics else "fail", f"final/ scored with {backend} (2 items per benchmark): "
                 f"{len(metrics)} metrics file(s)", data={"backend": backend})


def anchor_vllm(ctx: Context) -> Check:
    if not _imports("vllm"):
        return Check("anchor_vllm", "skip", "vllm does not import (pip install -e '.[vllm]' on the GPU machine)")
    done = _run([sys.executable, "-m", "asft_repro.anchor", f"model.path={ctx.folder}", "model.name=qwen7b_shape",
                 f"model.dtype={ctx.dtype}", "data=demo_math", f"data.data_dir={ctx.data}", "data.size=256",
                 "data.max_length=512", "anchor.backend=vllm", "anchor.k=32"], timeout=600)
    return Check("anchor_vllm", "fail" if done.returncode else "pass",
                 _last_line(done) if done.returncode else "the top-32 anchor cache of the 256 fixture records built by vLLM")


def memory_speed(ctx: Context) -> Check:
    """fsdp2 steps at the paper's per-GPU shape: max_memory_allocated vs the plan, tokens/s, MFU."""
    config = (ctx.shape["hidden_size"], ctx.layers, ctx.shape["vocab_size"], ctx.seq, 4, True)
    params = matmul_params(_meta_model(ctx.folder))
    peak = _peak_tflops()
    rows, parts = [], []
    for ranks in sorted({1, ctx.gpus}):
        row = run_config(ctx.out / "memcheck", config, "fsdp2", ranks, folder=ctx.folder, dtype=ctx.dtype)
        mfu = row["tokens_per_s"] * MODEL_FLOPS * params / (peak * 1e12 * ranks) if peak else None
        row.update({"tokens_per_s_per_gpu": row["tokens_per_s"] / ranks, "mfu": mfu})
        rows.append(row)
        parts.append(f"{ranks} GPU(s): {row['measured_GB']:.1f} GB measured / {row['predicted_GB']:.1f} GB planned "
                     f"({row['ratio']:.2f}), {row['tokens_per_s'] / ranks:,.0f} tokens/s per GPU"
                     + (f", MFU {mfu:.0%}" if mfu is not None else ""))
    ok = all(0.7 <= row["ratio"] <= 1.15 for row in rows)
    return Check("memory_speed", "pass" if ok else "fail", "; ".join(parts) + " (ratio bound 0.70-1.15)",
                 data={"rows": rows, "peak_tflops": peak, "flops_per_token": MODEL_FLOPS * params})


def lora(ctx: Context) -> Check:
    """``peft=lora`` (and ``peft=qlora`` when bitsandbytes imports): ASFT on one GPU, its anchor the adapter-off pass;
    final/ (the merged model) and final/adapter/ published."""
    kinds = ["lora"] + (["qlora"] if _imports("bitsandbytes") else [])
    parts, data = [], {}
    for kind in kinds:
        out = ctx.out / "runs" / kind
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        done = torchrun(1, "asft_repro.train", train_overrides(ctx, out, f"peft={kind}", strategy="ddp", ranks=1),
                        timeout=420)
        seconds = time.perf_counter() - start
        if done.returncode:
            return Check("lora", "fail", f"peft={kind}: {_last_line(done)}")
        if not ((out / "final" / "config.json").exists() and (out / "final" / "adapter" / "adapter_config.json").exists()):
            return Check("lora", "fail", f"peft={kind}: final/ or final/adapter/ missing in {out}")
        data[kind] = {"seconds": seconds}
        parts.append(f"peft={kind}: {TRAIN_STEPS} steps in {seconds:.0f} s (process start included), final/ + adapter/")
    if "qlora" not in kinds:
        parts.append("peft=qlora skipped: bitsandbytes is not installed (pip install 'asft-repro[qlora]')")
    return Check("lora", "pass", "; ".join(parts), data=data)


def bench(ctx: Context) -> Check:
    args = ["--repeats", "1", "--steps", "2"] + (["--vocab", "8192", "--seq", "64"] if ctx.smoke else [])
    done = _run([sys.executable, "-m", "asft_repro.bench", *args], timeout=600)
    if done.returncode:
        return Check("bench", "fail", _last_line(done))
    ratios = [line for line in done.stdout.splitlines() if "ratio" in line or "relative error" in line]
    shown = ratios[:4] + [line for line in ratios[4:] if "LoRA" in line]
    return Check("bench", "pass", "; ".join(shown), data={"output": done.stdout})


# ---- running and reporting -----------------------------------------------------------------------

def _env(extra: dict[str, str] | None) -> dict[str, str]:
    """The children's environment: offline, wandb off, the repository first on an existing PYTHONPATH (packages
    installed with ``pip install --target`` stay importable)."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled", **(extra or {})}


def _run(command: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``command``; on timeout it and every process it started (torchrun's ranks) are killed."""
    with subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=_env(env)) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            out, err = proc.communicate()
            err = f"{err}\ntimed out after {timeout:.0f} s"
    if proc.returncode:  # the summary keeps one line; the console gets the end of the child's own output
        tail = "\n".join((err or out or "").strip().splitlines()[-40:])
        print(f"[gpu-check] `{' '.join(command[:6])} ...` exited {proc.returncode}; its last lines:\n{tail}",
              file=sys.stderr, flush=True)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _run_until(command: list[str], marker: Path, timeout: float, env: dict[str, str], log: Path) -> str:
    """Run ``command`` (output to ``log``) and SIGKILL its whole process group as soon as ``marker`` holds complete
    JSON, as a pre-empted job dies; ``killed``, ``ended`` (before the marker) or ``timed out``."""
    with open(log, "w") as sink, subprocess.Popen(command, cwd=REPO_ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                                  env=_env(env)) as proc:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if _json_complete(marker):
                kill_tree(proc.pid)
                proc.wait()
                return "killed"
            time.sleep(0.05)
        if proc.poll() is None:
            kill_tree(proc.pid)
            return "timed out"
    return "ended"


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it: torchrun starts each rank in a session of its own, so killing
    torchrun's process group would leave the ranks running."""
    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _json_complete(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def _last_line(done: subprocess.CompletedProcess) -> str:
    """The failure's one line: a project error (``asft_repro.x: ...``) or the last exception line of any rank,
    else the last line (torchrun's own summary hides the rank's error above it)."""
    lines = [line.split("]: ", 1)[-1] if line.startswith("[rank") else line
             for line in (done.stderr or "").strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("asft_repro.", "eval.")) or
              (":" in line and line.split(":", 1)[0].endswith(("Error", "Exception")) and " " not in line.split(":", 1)[0])]
    return ((errors or lines or ["(no output)"])[-1])[-300:]


def _max_diff(a: Path, b: Path) -> float:
    def weights(folder: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    x, y = weights(a), weights(b)
    if x.keys() != y.keys():
        return float("inf")
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def _imports(module: str) -> bool:
    """Whether an optional dependency (vllm, bitsandbytes) imports here."""
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means: not usable here
        return False
    return True


def _peak_tflops() -> float | None:
    """Dense bf16 peak of one GPU: GPU_PEAK_TFLOPS, else by the device name (None when unknown)."""
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"])
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def machine() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {"host": platform.node(), "gpus": torch.cuda.device_count() if cuda else 0,
            "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
            "cuda": torch.version.cuda, "vllm": _imports("vllm")}


def run_checks(ctx: Context, steps: list[Callable[[Context], Check]],
               report: Callable[[list[Check]], Any] | None = None) -> list[Check]:
    """Each step in turn; an exception is that step's failure (its last line), and the later steps still run.
    ``report`` gets the rows so far after every step."""
    results: list[Check] = []
    for step in steps:
        start = time.perf_counter()
        try:
            check = step(ctx)
        except Exception as err:  # noqa: BLE001 - reported as the check's failure
            traceback.print_exc()
            first = str(err).splitlines()[0][:300] if str(err) else ""
            check = Check(step.__name__, "fail", f"{type(err).__name__}: {first}")
        check.seconds = round(time.perf_counter() - start, 1)
        print(f"[gpu-check] {check.name}: {check.status} ({check.seconds:.0f} s) {check.detail}", flush=True)
        results.append(check)
        if report is not None:
            report(results)
        if check.name in ("model", "data") and check.status == "fail":
            break  # nothing else can run
    return results


def write_summary(results: list[Check], out: Path, info: dict[str, Any]) -> tuple[Path, Path]:
    """``summary.json`` (machine, checks, passed) and ``summary.md`` (a table) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    passed = all(r.status != "fail" for r in results)
    payload = {"passed": passed, "machine": info, "checks": [asdict(r) for r in results],
               "seconds": round(sum(r.seconds for r in results), 1)}
    json_path, md_path = out / "summary.json", out / "summary.md"
    json_path.write_text(json.dumps(payload, indent=2, default=str))
    lines = [f"# GPU check: {'PASSED' if passed else 'FAILED'}", "",
             f"{info.get('gpus')} x {info.get('gpu')}, torch {info.get('torch')}, CUDA {info.get('cuda')}, "
             f"vLLM {'yes' if info.get('vllm') else 'no'}; {payload['seconds']:.0f} s in all", "",
             "| check | status | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.detail.replace('|', '/')} |" for r in results]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


STEPS: dict[str, Callable[[Context], Check]] = {
    "model": build_model, "data": prepare_data, "fused_vs_logits": fused_vs_logits, "fsdp2_1gpu": one_gpu,
    "fsdp2_all_gpus": all_gpus, "memory_speed": memory_speed, "lora": lora, "kill_resume": kill_resume,
    "eval": evaluate, "anchor_vllm": anchor_vllm, "bench": bench}  # the slow, disk-heavy kill/resume after the rest
NEEDS = {"fsdp2_all_gpus": ["fsdp2_1gpu"], "kill_resume": ["fsdp2_1gpu"], "eval": ["fsdp2_1gpu"]}  # the runs they use


def selected_steps(checks: str | None) -> list[Callable[[Context], Check]]:
    """The steps ``--checks`` names (comma-separated), with ``model``, ``data`` and the runs they need, in STEPS'
    order; every step when ``checks`` is empty. An unknown name is one line naming the known ones."""
    if not checks:
        return list(STEPS.values())
    names = [name.strip() for name in checks.split(",") if name.strip()]
    unknown = [name for name in names if name not in STEPS]
    if unknown:
        sys.exit(f"{PROG}: unknown check(s) {', '.join(unknown)} in --checks; known: {', '.join(STEPS)}")
    wanted = {"model", "data", *names, *(need for name in names for need in NEEDS.get(name, []))}
    return [step for name, step in STEPS.items() if name in wanted]


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/gpu_check")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the 7B-shaped model")
    parser.add_argument("--checks", default="", help=f"comma-separated subset of: {', '.join(STEPS)}")
    parser.add_argument("--smoke-on-cpu", action="store_true", help=argparse.SUPPRESS)  # development: tiny shape, CPU
    args = parser.parse_args(argv)
    steps = selected_steps(args.checks)
    if not torch.cuda.is_available() and not args.smoke_on_cpu:
        sys.exit(f"{PROG}: no CUDA GPU is visible (torch.cuda.is_available() is False); run `make gpu-check` on a GPU "
                 f"machine with the CUDA build of torch")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 2
    if args.smoke_on_cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    ctx = Context(out=Path(args.out).resolve(), shape=SMOKE_SHAPE if args.smoke_on_cpu else PAPER_SHAPE,
                  layers=args.layers, gpus=gpus, seq=256 if args.smoke_on_cpu else 2048, smoke=args.smoke_on_cpu)
    ctx.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    results = run_checks(ctx, steps, report=lambda rows: write_summary(rows, ctx.out, info))
    json_path, md_path = write_summary(results, ctx.out, info)
    failed = [r.name for r in results if r.status == "fail"]
    print(f"[gpu-check] summary: {md_path} and {json_path}")
    if failed:
        sys.exit(f"{PROG}: {len(failed)} check(s) failed ({', '.join(failed)}); see {md_path}")


if __name__ == "__main__":
    main()
