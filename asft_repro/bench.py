"""ASFT vs SFT cost in one run: step-time ratio and peak-memory ratio.

python -m asft_repro.bench [--vocab 32000 --hidden 128 --layers 2 --seq 256 --batch 4 --steps 8]

Each method runs in a fresh child process on the same random Qwen2 model and batch (half of
every sequence is prompt). Peak memory is CUDA's max allocated on a GPU, else the growth of
peak RSS over the process's state after set-up. ASFT's extra cost is one no-grad forward of
the frozen base model and the chunked full-vocabulary KL.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from asft_repro.cli import OneLineParser


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_method(method: str, args: argparse.Namespace) -> dict[str, float]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from asft_repro.losses import IGNORE_INDEX, compute_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq)
    policy = Qwen2ForCausalLM(config).to(device, dtype)
    base = Qwen2ForCausalLM(config).to(device, dtype).eval().requires_grad_(False) if method != "sft" else None
    if base is not None:
        base.load_state_dict(policy.state_dict())
    optim = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    labels = ids.clone()
    labels[:, : args.seq // 2] = IGNORE_INDEX

    def step() -> None:
        logits = policy(input_ids=ids).logits
        base_logits = None
        if base is not None:
            with torch.no_grad():
                base_logits = base(input_ids=ids).logits
        loss, _ = compute_loss(logits, labels, method, base_logits=base_logits)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    step()  # warm-up (allocates optimizer state)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mb()
    return {"step_s": seconds, "peak_mb": peak, "rss_setup_mb": rss_before, "device": device}


def main() -> None:
    parser = OneLineParser(prog="asft_repro.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_method(args.child, args)))
        return
    results = {}
    for method in ("sft", "dft", "asft"):
        cmd = [sys.executable, "-m", "asft_repro.bench", "--child", method] + [
            f"--{k}={v}" for k, v in vars(args).items() if k != "child"]
        results[method] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    print(f"shape: batch {args.batch} x seq {args.seq} x vocab {args.vocab}, {args.layers} layers, hidden {args.hidden}, "
          f"device {results['sft']['device']}")
    for method, r in results.items():
        print(f"{method:5s} step {r['step_s'] * 1000:8.1f} ms   peak {r['peak_mb']:8.1f} MB")
    print(f"ASFT/SFT step-time ratio: {results['asft']['step_s'] / results['sft']['step_s']:.2f}")
    print(f"ASFT/SFT peak-memory ratio: {results['asft']['peak_mb'] / results['sft']['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
