"""The paper's published Table 1 averages (ASFT, ICLR 2026), for side-by-side comparison.

A cell of ours is compared only with the paper cell it reproduces: same model (Medical: LLaMA-2-7B,
Math: Qwen2.5-7B), domain, data size and method, with ASFT at the paper's λ=0.05 and forward KL.
"""

from __future__ import annotations

from asft_repro.benchmarks import average_label, domains

PAPER_MODELS: dict[str, str] = {"medical": "llama2-7b", "math": "qwen2.5-7b"}
PAPER_KL_COEF = 0.05  # the paper's λ, and every default λ of this project (config, losses, fused head)
PAPER_KL_DIRECTION = "forward"
AVG_COLUMN: dict[str, str] = {domain: average_label(domain) for domain in domains()}

PAPER_TABLE1_AVG: dict[tuple[str, str], dict[str, float]] = {
    ("-", "base"): {"Medical Avg": 31.38, "Math Avg": 12.61},
    ("10k", "sft"): {"Medical Avg": 33.37, "Math Avg": 16.73},
    ("10k", "dft"): {"Medical Avg": 29.19, "Math Avg": 27.77},
    ("10k", "asft"): {"Medical Avg": 42.03, "Math Avg": 28.75},
    ("30k", "sft"): {"Medical Avg": 36.02, "Math Avg": 19.93},
    ("30k", "dft"): {"Medical Avg": 33.14, "Math Avg": 27.66},
    ("30k", "asft"): {"Medical Avg": 42.01, "Math Avg": 27.18},
    ("100k", "sft"): {"Medical Avg": 35.71, "Math Avg": 19.15},
    ("100k", "dft"): {"Medical Avg": 38.06, "Math Avg": 26.04},
    ("100k", "asft"): {"Medical Avg": 39.98, "Math Avg": 30.50},
}


def is_paper_kl(kl_coef: float | None, kl_direction: str | None) -> bool:
    """True for the paper's anchor: λ=0.05, KL(base || policy)."""
    return kl_coef is not None and abs(float(kl_coef) - PAPER_KL_COEF) < 1e-12 and kl_direction == PAPER_KL_DIRECTION


def paper_average(model: str, domain: str, size: str, method: str,
                  kl_coef: float | None = None, kl_direction: str | None = None) -> float | None:
    """The paper's domain average for the cell this one reproduces, or None when there is no such cell."""
    if PAPER_MODELS.get(domain) != model:
        return None
    if method == "asft" and not is_paper_kl(kl_coef, kl_direction):
        return None
    key = ("-" if method == "base" else str(size).lower(), method)
    return PAPER_TABLE1_AVG.get(key, {}).get(AVG_COLUMN[domain])
