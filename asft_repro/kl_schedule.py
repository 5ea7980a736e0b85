"""The λ in force at each optimizer step (``method.kl_schedule``).

Step k counts optimizer steps from 0; T = the run's optimizer steps; W = the warmup steps.

    constant   λ_k = kl_coef
    linear     λ_k = kl_coef · k / W  (k < W),  then  kl_coef + (kl_coef_end − kl_coef) · s
    cosine     as linear with s replaced by (1 − cos(π s)) / 2;   s = (k − W) / (T − 1 − W), in [0, 1]
    adaptive   λ_0 = kl_coef; after step k, with KL_k that step's all-rank token-mean KL in the optimized direction,
               λ ← clamp(λ · (1 + clip((KL_k − target) / target, −0.2, 0.2) / horizon), kl_coef_min, kl_coef_max)

The adaptive rule is a proportional controller (Ziegler et al. 2019's adaptive KL penalty, per optimizer step).
The callback that holds λ during training is asft_repro/kl_controller.py; this module imports neither torch nor
transformers (run names and tables use it).
"""

from __future__ import annotations

import math
from typing import Any, Optional

SCHEDULES = ("constant", "linear", "cosine", "adaptive")
ADAPTIVE_CLIP = 0.2  # the largest relative KL error one step acts on
# method.* keys each schedule reads (besides kl_coef); the others are left out of the run identity
SCHEDULE_SETTINGS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "linear": ("kl_coef_end", "kl_warmup_steps", "kl_warmup_ratio"),
    "cosine": ("kl_coef_end", "kl_warmup_steps", "kl_warmup_ratio"),
    "adaptive": ("kl_target", "kl_horizon", "kl_coef_min", "kl_coef_max"),
}
SCHEDULE_KEYS = ("kl_schedule", *sorted({k for keys in SCHEDULE_SETTINGS.values() for k in keys}))


def warmup_steps(steps: int, ratio: float, max_steps: int) -> int:
    """``steps`` if set, else ``ceil(ratio · max_steps)`` (as transformers counts ``warmup_ratio``)."""
    return steps if steps > 0 else math.ceil(ratio * max_steps)


def scheduled_coef(schedule: str, start: float, end: Optional[float], step: int, max_steps: int, warmup: int = 0) -> float:
    """λ at optimizer step ``step`` (0-based) of ``max_steps`` for constant / linear / cosine (see the module doc)."""
    if schedule == "constant" or end is None:
        return start
    if step < warmup:
        return start * step / warmup
    span = max_steps - 1 - warmup
    s = min(max((step - warmup) / span, 0.0), 1.0) if span > 0 else 1.0
    if schedule == "cosine":
        s = (1.0 - math.cos(math.pi * s)) / 2.0
    return start + (end - start) * s


def adaptive_coef(coef: float, kl: float, target: float, horizon: float, low: float, high: float) -> float:
    """One adaptive update of λ after an optimizer step whose token-mean KL was ``kl``."""
    error = min(max((kl - target) / target, -ADAPTIVE_CLIP), ADAPTIVE_CLIP)
    return min(max(coef * (1.0 + error / horizon), low), high)


def schedule_label(method: dict[str, Any]) -> str:
    """How a run's λ moves, for tables and plots: '' (constant), 'linear to 0.005', 'adaptive KL=0.3 h=10'."""
    schedule = method.get("kl_schedule") or "constant"
    if schedule == "adaptive":
        return f"adaptive KL={method['kl_target']:g} h={method.get('kl_horizon', 10.0):g}"
    if schedule in ("linear", "cosine"):
        warm = method.get("kl_warmup_steps") or method.get("kl_warmup_ratio") or 0
        return f"{schedule} to {method['kl_coef_end']:g}" + (f" warmup {warm:g}" if warm else "")
    return ""


def schedule_tag(method: dict[str, Any]) -> str:
    """The run-name part: '' (constant), '-klsched_adaptive-t0.3', '-klsched_linear-end0.005'."""
    schedule = method.get("kl_schedule") or "constant"
    if schedule == "adaptive":
        return f"-klsched_adaptive-t{method['kl_target']}"
    if schedule in ("linear", "cosine"):
        return f"-klsched_{schedule}-end{method['kl_coef_end']}"
    return ""
