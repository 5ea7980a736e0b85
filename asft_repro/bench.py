"""ASFT's cost over SFT, and over the paper-code-style loss: step time and peak memory, each variant alone.

python -m asft_repro.bench [--vocab 151936 --hidden 128 --layers 2 --seq 256 --batch 4 --steps 4 --repeats 3]

Variants (each in a fresh child process, on the same random Qwen2 policy, a frozen copy as the base, and
one batch whose first half of every sequence is prompt; one AdamW step per iteration):

* ``sft``, ``dft``, ``asft``: the trainer's default path, the response-only fused head (asft_repro/fused_head.py);
* ``asft_logits``: ASFT through full [B, T, V] logits and the chunked ``compute_loss`` (the logits-level API);
* ``asft_naive``: the reference repository's formulas: full-vocabulary softmax at every position, full
  logits of policy and base kept, then masked;
* ``asft_cached``: ASFT on the fused path with ``method.anchor=cache``: the base's top-k rows (k =
  ``method.anchor_k``'s default) are built in memory from the frozen copy before the timed steps, then the base
  is freed before the post-setup memory mark, so no base forward and no base weights count;
* ``sft_lora``, ``asft_lora``: ``peft=lora`` (rank 8, every block linear; asft_repro/lora.py) on the same policy,
  no base copy: ASFT's anchor is the adapter-off pass of the policy itself (fused head, the shared frozen head).
  Their memory lines (and ``ASFT-LoRA/full-ASFT``) compare the whole peak, weights included (CUDA: max allocated;
  CPU: peak RSS over the process before any model was built), since the point is the base copy that is not there.

``cached-anchor KL relative error`` is the cached forward KL's relative error at the default k on a random Qwen2 of
the bench's vocabulary and hidden size whose head is scaled to a 1.5-nat base entropy, the policy a perturbed copy
(``asft_repro.anchor.kl_errors``; ``python -m asft_repro.anchor --error-table`` gives the whole table).

``--lengths realistic`` times padding-free batches (``train.padding_free``, asft_repro/padding_free.py) instead:
ASFT on the fused path, a micro-batch of ``--batch`` records whose (prompt, response) token counts are drawn per
repeat from the prepared data (``--data-file``, tokenised with ``--tokenizer``, when both are at hand) or else from
:data:`asft_repro.lengths.FITTED` (a log-normal stand-in for NuminaMath-CoT), once padded (``asft_padded``) and once
as one packed row (``asft_packed``), on a model whose decoder outweighs its head as a 1.5B model's does (hidden 256,
4 layers, vocabulary 8192 unless given). It prints ``padding-free/padded step-time ratio`` and
``padding-free max |dloss|`` (the first step's loss, packed against padded, from the same weights).

Each repeat runs every variant once, in turn; ratios are taken within a repeat and reported as median
(min). Peak memory: CUDA's max allocated on a GPU; on CPU the growth of peak RSS over the state after
set-up (models, optimizer, batch), with glibc told to return large blocks to the system
(MALLOC_MMAP_THRESHOLD_), so library baseline RSS does not hide the difference.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from asft_repro import lora
from asft_repro.anchor import kl_errors, random_pair
from asft_repro.anchor_cache import AnchorRows, topk_rows
from asft_repro.cli import OneLineParser
from asft_repro.config import DataConfig, MethodConfig, ModelConfig, PeftConfig
from asft_repro.data import PadCollator
from asft_repro.fused_head import FusedLoss, auto_chunk_rows, enable_fused_head, head_weight, logits_rows, response_hidden
from asft_repro.lengths import FITTED, data_lengths
from asft_repro.losses import IGNORE_INDEX, chunks, compute_loss
from asft_repro.padding_free import PaddingFreeCollator, enable_padding_free
from asft_repro.paper import PAPER_KL_COEF

VARIANTS = ("sft", "dft", "asft", "asft_logits", "asft_naive", "asft_cached", "sft_lora", "asft_lora")
LORA_RANK = 8
LENGTH_VARIANTS = ("asft_padded", "asft_packed")  # --lengths realistic
REALISTIC_SHAPE = {"vocab": 8192, "hidden": 256, "layers": 4}  # decoder FLOPs ~5x the head's, as Qwen2.5-Math-1.5B
# (printed label, variant, reference variant, measure): LoRA lines compare whole peaks (weights included)
RATIO_LINES = [
    ("ASFT/SFT step-time ratio", "asft", "sft", "step_s"),
    ("ASFT/SFT peak-memory ratio", "asft", "sft", "peak_mb"),
    ("ASFT/naive peak-memory ratio", "asft", "asft_naive", "peak_mb"),
    ("ASFT/logits-path peak-memory ratio", "asft", "asft_logits", "peak_mb"),
    ("ASFT/logits-path step-time ratio", "asft", "asft_logits", "step_s"),
    ("cached-anchor ASFT/SFT step-time ratio", "asft_cached", "sft", "step_s"),
    ("cached-anchor ASFT/SFT peak-memory ratio", "asft_cached", "sft", "peak_mb"),
    ("ASFT-LoRA/SFT-LoRA peak-memory ratio", "asft_lora", "sft_lora", "total_mb"),
    ("ASFT-LoRA/SFT-LoRA step-time ratio", "asft_lora", "sft_lora", "step_s"),
    ("ASFT-LoRA/full-ASFT peak-memory ratio", "asft_lora", "asft", "total_mb"),
]


def _rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def naive_asft_loss(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor,
                    kl_coef: float = PAPER_KL_COEF) -> torch.Tensor:
    """The reference code's ASFT: softmax / KL over the full vocabulary at every position, then the response mask."""
    shift_logits, shift_base, shift_labels = logits[:, :-1], base_logits[:, :-1], labels[:, 1:]
    mask = shift_labels != -100
    safe = shift_labels.clamp(min=0)
    ce = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), safe.reshape(-1),
                                           reduction="none").view_as(safe)
    probs = torch.softmax(shift_logits, dim=-1)
    p_y = probs.gather(-1, safe[..., None]).squeeze(-1).detach()
    base_probs = torch.softmax(shift_base, dim=-1)
    kl = (base_probs * (torch.log_softmax(shift_base, -1) - torch.log_softmax(shift_logits, -1))).sum(-1)
    per_token = ce * p_y + kl_coef * kl
    return (per_token * mask).sum() / mask.sum()


def cached_anchor_rows(base, ids: torch.Tensor, labels: torch.Tensor, k: int):
    """The in-memory anchor of one batch: the base's top-k rows, as ``python -m asft_repro.anchor`` builds them."""
    with torch.no_grad():
        hidden = response_hidden(base, ids, None, labels)
        weight, bias = head_weight(base.lm_head)
        parts = [topk_rows(logits_rows(hidden[sl], weight, bias, torch.float32), k)
                 for sl in chunks(hidden.shape[0], max(1, auto_chunk_rows(weight.shape[0]) // 4))]
    return AnchorRows(*(torch.cat([getattr(p, f) for p in parts]) for f in ("ids", "logprobs", "log_rest")))


def make_step(variant: str, policy, base, ids: torch.Tensor, labels: torch.Tensor,
              anchor=None) -> Callable[[], torch.Tensor]:
    """One variant's loss computation (forward of policy and base, or the cached anchor's rows)."""
    if variant == "asft_cached":
        enable_fused_head(policy)

        def cached() -> torch.Tensor:
            rows, _stats = policy(input_ids=ids, from_hidden=FusedLoss(labels, "asft", anchor=anchor))
            return rows.sum() / max(rows.numel(), 1)
        return cached

    if variant in ("sft_lora", "asft_lora"):  # the policy is a PeftModel; the anchor its adapter-off pass
        enable_fused_head(policy)

        def adapter() -> torch.Tensor:
            base_hidden = head = None
            if variant == "asft_lora":
                with torch.no_grad(), lora.adapter_off(policy):
                    base_hidden = response_hidden(policy, ids, None, labels)
                head = policy.get_output_embeddings()
            rows, _stats = policy(input_ids=ids, from_hidden=FusedLoss(labels, variant.removesuffix("_lora"),
                                                                        base_hidden, head))
            return rows.sum() / max(rows.numel(), 1)
        return adapter

    if variant in ("sft", "dft", "asft"):
        enable_fused_head(policy)

        def fused() -> torch.Tensor:
            base_hidden = None
            if variant == "asft":
                with torch.no_grad():
                    base_hidden = response_hidden(base, ids, None, labels)
            base_head = base.lm_head if base is not None else None
            rows, _stats = policy(input_ids=ids, from_hidden=FusedLoss(labels, variant, base_hidden, base_head))
            return rows.sum() / max(rows.numel(), 1)
        return fused

    def with_logits() -> torch.Tensor:
        logits = policy(input_ids=ids).logits
        with torch.no_grad():
            base_logits = base(input_ids=ids).logits
        if variant == "asft_naive":
            return naive_asft_loss(logits, base_logits, labels)
        return compute_loss(logits, labels, "asft", base_logits=base_logits)[0]
    return with_logits


def length_batch(records: str, vocab: int, packed: bool, device: str) -> dict[str, torch.Tensor]:
    """``--records "p:r,p:r,..."`` (prompt, response token counts) as random-token records, padded or packed."""
    gen = torch.Generator().manual_seed(0)
    feats = []
    for pair in records.split(","):
        prompt, response = map(int, pair.split(":"))
        ids = torch.randint(0, vocab, (prompt + response,), generator=gen).tolist()
        feats.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    batch = PaddingFreeCollator()(feats) if packed else PadCollator(0)(feats)
    return {k: v.to(device) for k, v in batch.items()}


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, float | str]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rss_start = _rss_now_mb()
    torch.manual_seed(0)
    batch = length_batch(args.records, args.vocab, variant == "asft_packed", device) if args.records else None
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max(args.seq, args.max_length), tie_word_embeddings=False)
    policy = Qwen2ForCausalLM(config).to(device, dtype)
    base = None
    if variant.endswith("_lora"):
        policy = lora.wrap(policy, PeftConfig(method="lora", r=LORA_RANK), gradient_checkpointing=False)
    elif variant not in ("sft", "dft"):
        base = Qwen2ForCausalLM(config).to(device, dtype).eval().requires_grad_(False)
        base.load_state_dict(policy.state_dict())
    optim = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    if batch is not None:
        ids, labels = batch["input_ids"], batch["labels"]
    else:
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
        labels = ids.clone()
        labels[:, : args.seq // 2] = IGNORE_INDEX
    anchor = None
    if variant == "asft_cached":  # built before the timed steps; the base is then freed (it is never loaded in training)
        anchor = cached_anchor_rows(base, ids, labels, MethodConfig().anchor_k).to(device)
        base = None
        gc.collect()
    if variant in LENGTH_VARIANTS:
        loss_fn = length_step(variant == "asft_packed", policy, base, batch)
    else:
        loss_fn = make_step(variant, policy, base, ids, labels, anchor)
    losses = []

    def step() -> None:
        loss = loss_fn()
        losses.append(loss.item())
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    rss_setup = _rss_now_mb()
    step()  # warm-up: allocates the optimizer state (the same for every variant)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_peak_mb() - rss_setup
    # weights included: CUDA's max allocated already counts them; on CPU the peak over the process before the models
    total = peak if device == "cuda" else _rss_peak_mb() - rss_start
    frozen_mb = sum(p.numel() * p.element_size() for p in policy.parameters() if not p.requires_grad) / 2**20
    return {"step_s": seconds, "peak_mb": peak, "total_mb": total, "frozen_mb": frozen_mb, "device": device,
            "first_loss": losses[0]}


def length_step(packed: bool, policy, base, batch: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """ASFT on the fused path over a padded batch or a packed row (attention per record, position ids per record)."""
    if packed and not enable_padding_free(policy, base):  # what train.py does: the per-record attention
        raise RuntimeError("the bench model cannot take packed rows")
    enable_fused_head(policy)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    labels = batch["labels"]

    def fused() -> torch.Tensor:
        with torch.no_grad():
            base_hidden = response_hidden(base, inputs["input_ids"], inputs.get("attention_mask"), labels,
                                          position_ids=inputs.get("position_ids"))
        rows, _stats = policy(**inputs, from_hidden=FusedLoss(labels, "asft", base_hidden, base.lm_head))
        return rows.sum() / max(rows.numel(), 1)
    return fused


def child(variant: str, args: argparse.Namespace) -> dict[str, float | str]:
    cmd = [sys.executable, "-m", "asft_repro.bench", "--child", variant] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
        if k not in ("child", "repeats", "lengths", "data_file", "tokenizer") and v is not None]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors go back to the OS: RSS = live memory
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"asft_repro.bench: variant {variant} failed ({(done.stderr.strip().splitlines() or ['?'])[-1]}); "
                 f"run `python -m asft_repro.bench --child {variant}` with the same options to see the traceback")
    return json.loads(done.stdout.splitlines()[-1])


def ratio_line(label: str, ratios: list[float]) -> str:
    return f"{label}: {statistics.median(ratios):.2f} (min {min(ratios):.2f}, {len(ratios)} repeats)"


def main() -> None:
    parser = OneLineParser(prog="asft_repro.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151936, help="Qwen2.5's vocabulary by default")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", choices=("fixed", "realistic"), default="fixed",
                        help="realistic: padded vs padding-free micro-batches of real record lengths")
    parser.add_argument("--data-file", default="data/numina_cot/10k/train.jsonl",
                        help="--lengths realistic: the prepared data whose token lengths are drawn")
    parser.add_argument("--tokenizer", default="Qwen/Qwen2.5-Math-1.5B", help="--lengths realistic: tokenises --data-file")
    parser.add_argument("--max-length", type=int, default=2048, help="--lengths realistic: data.max_length")
    parser.add_argument("--records", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of the variants (e.g. sft_lora,asft_lora,asft); a ratio line is "
                             "printed when both of its variants ran")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args)))
        return
    if args.lengths == "realistic":
        length_bench(parser, args)
        return
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or not chosen:
        parser.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    runs: dict[str, list[dict]] = {v: [] for v in chosen}
    for repeat in range(args.repeats):
        for variant in chosen:
            runs[variant].append(child(variant, args))
        print(f"[bench] repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    device = runs[chosen[0]][0]["device"]
    print(f"shape: batch {args.batch} x seq {args.seq} x vocab {args.vocab}, {args.layers} layers, hidden {args.hidden}; "
          f"device {device}; {args.steps} steps x {args.repeats} repeats; peak = "
          + ("CUDA max allocated" if device == "cuda" else "peak RSS growth over the post-setup state"))
    print("| variant | step ms (median) | step ms (min) | peak MB (median) | peak MB (min) |\n|---|---:|---:|---:|---:|")
    for variant, results in runs.items():
        steps = [r["step_s"] * 1000 for r in results]
        peaks = [r["peak_mb"] for r in results]
        print(f"| {variant} | {statistics.median(steps):.1f} | {min(steps):.1f} | {statistics.median(peaks):.1f} | {min(peaks):.1f} |")

    for label, a, b, key in RATIO_LINES:
        if a in runs and b in runs:
            print(ratio_line(label, [x[key] / y[key] for x, y in zip(runs[a], runs[b])]))
    if "asft_lora" in runs and "sft_lora" in runs:
        extra = statistics.median(a["total_mb"] - b["total_mb"] for a, b in zip(runs["asft_lora"], runs["sft_lora"]))
        print(f"ASFT-LoRA over SFT-LoRA: {extra:+.0f} MB peak (the adapter-off pass and the base's hidden rows); a "
              f"base copy would be {runs['asft_lora'][0]['frozen_mb']:.0f} MB")
    k = MethodConfig().anchor_k
    errors = kl_errors(*random_pair(args.vocab, hidden=args.hidden)[:2], k)
    print(f"cached-anchor KL relative error: {errors['fwd_value_err']:.4f} (forward KL at k={k}; gradient "
          f"{errors['fwd_grad_err']:.4f}; reverse {errors['rev_value_err']:.4f} / {errors['rev_grad_err']:.4f})")


def record_lengths(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    """(prompt, response) token counts to draw micro-batches from, and where they come from."""
    data = DataConfig(train_file=args.data_file, max_length=args.max_length)
    found = data_lengths(data, ModelConfig(name="bench", path=args.tokenizer)) if Path(args.data_file).exists() else None
    if found is not None:
        return found[0], found[1], f"token lengths of {found[2]} ({args.tokenizer}, max_length {args.max_length})"
    prompt, response = FITTED.sample(100_000, args.max_length)
    return prompt, response, (f"asft_repro.lengths.FITTED (log-normal NuminaMath-CoT stand-in; {args.data_file} or "
                              f"the tokenizer {args.tokenizer} not at hand)")


def length_bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--lengths realistic: padded vs packed ASFT micro-batches of real lengths; ratio and loss difference lines."""
    for key, value in REALISTIC_SHAPE.items():  # the realistic shape unless given on the command line
        if getattr(args, key) == parser.get_default(key):
            setattr(args, key, value)
    prompt, response, source = record_lengths(args)
    runs: dict[str, list[dict]] = {v: [] for v in LENGTH_VARIANTS}
    real = padded = 0
    for repeat in range(args.repeats):
        pick = np.random.default_rng(repeat).choice(len(prompt), args.batch, replace=False)
        args.records = ",".join(f"{prompt[i]}:{response[i]}" for i in pick)
        lengths = prompt[pick] + response[pick]
        real, padded = real + int(lengths.sum()), padded + int(lengths.max()) * args.batch
        for variant in LENGTH_VARIANTS:
            runs[variant].append(child(variant, args))
        print(f"[bench] repeat {repeat + 1}/{args.repeats} done ({args.records})", file=sys.stderr)
    device = runs["asft_padded"][0]["device"]
    print(f"lengths: {source}; {args.repeats} micro-batches of {args.batch} records, {real / padded:.0%} of the padded "
          f"tokens real")
    print(f"shape: vocab {args.vocab}, {args.layers} layers, hidden {args.hidden}; device {device}; ASFT, fused head; "
          f"{args.steps} steps x {args.repeats} repeats")
    for variant, results in runs.items():
        steps = [r["step_s"] * 1000 for r in results]
        print(f"{variant}: step ms median {statistics.median(steps):.1f}, min {min(steps):.1f}")
    ratios = [x["step_s"] / y["step_s"] for x, y in zip(runs["asft_packed"], runs["asft_padded"])]
    print(ratio_line("padding-free/padded step-time ratio", ratios))
    dloss = max(abs(x["first_loss"] - y["first_loss"]) for x, y in zip(runs["asft_packed"], runs["asft_padded"]))
    print(f"padding-free max |dloss|: {dloss:.2e}")


if __name__ == "__main__":
    main()
