"""The λ in force at each optimizer step (``method.kl_schedule``), and the callback that holds it.

Step k counts optimizer steps from 0; T = the run's optimizer steps; W = the warmup steps.

    constant   λ_k = kl_coef
    linear     λ_k = kl_coef · k / W  (k < W),  then  kl_coef + (kl_coef_end − kl_coef) · s
    cosine     as linear with s replaced by (1 − cos(π s)) / 2;   s = (k − W) / (T − 1 − W), in [0, 1]
    adaptive   λ_0 = kl_coef; after step k, with KL_k that step's all-rank token-mean KL in the optimized direction,
               λ ← clamp(λ · (1 + clip((KL_k − target) / target, −0.2, 0.2) / horizon), kl_coef_min, kl_coef_max)

The adaptive rule is a proportional controller (Ziegler et al. 2019's adaptive KL penalty, per optimizer step).
:class:`KLController` is a ``TrainerCallback`` + ``ExportableState``: its λ is saved in every checkpoint's
trainer_state.json (``stateful_callbacks``) and restored on resume, so a resumed run continues the same λ path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

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


def all_rank_sum(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """``values`` summed over every rank of the default process group (float64); as is with one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    totals = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return totals.tolist()


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


class KLController(TrainerCallback, ExportableState):
    """Holds λ for the trainer's loss (:meth:`coef_at`), moves it after each optimizer step (adaptive), and
    saves / restores it with the checkpoint.

    The trainer feeds every training micro-batch's KL token sums to :meth:`add`; ``on_step_end`` sums them over
    the accumulation and all ranks once per optimizer step (one collective, only for ``adaptive``).
    """

    def __init__(self, schedule: str = "constant", kl_coef: float = 0.05, kl_coef_end: Optional[float] = None,
                 kl_warmup_steps: int = 0, kl_warmup_ratio: float = 0.0, kl_target: Optional[float] = None,
                 kl_horizon: float = 10.0, kl_coef_min: float = 1e-4, kl_coef_max: float = 10.0,
                 kl_direction: str = "forward") -> None:
        self.settings = dict(schedule=schedule, kl_coef=kl_coef, kl_coef_end=kl_coef_end, kl_warmup_steps=kl_warmup_steps,
                             kl_warmup_ratio=kl_warmup_ratio, kl_target=kl_target, kl_horizon=kl_horizon,
                             kl_coef_min=kl_coef_min, kl_coef_max=kl_coef_max, kl_direction=kl_direction)
        self.coef = kl_coef  # adaptive: λ for the next optimizer step (saved in checkpoints)
        self.last_used = kl_coef  # the λ of the latest training loss (what the logs show)
        self._kl_key = f"kl_{kl_direction}_sum"
        self._kl_sum = 0.0
        self._tokens = 0.0

    @classmethod
    def from_method(cls, method: Any) -> "KLController":
        """From a ``MethodConfig`` (asft_repro/config.py)."""
        return cls(method.kl_schedule, method.kl_coef, method.kl_coef_end, method.kl_warmup_steps, method.kl_warmup_ratio,
                   method.kl_target, method.kl_horizon, method.kl_coef_min, method.kl_coef_max, method.kl_direction)

    @property
    def schedule(self) -> str:
        return self.settings["schedule"]

    def coef_at(self, step: int, max_steps: int) -> float:
        """λ for optimizer step ``step`` (0-based) of ``max_steps``."""
        s = self.settings
        if self.schedule == "adaptive":
            return self.coef
        warmup = warmup_steps(s["kl_warmup_steps"], s["kl_warmup_ratio"], max_steps)
        return scheduled_coef(self.schedule, s["kl_coef"], s["kl_coef_end"], step, max_steps, warmup)

    def add(self, sums: dict[str, float], coef: float) -> None:
        """One training micro-batch's token sums (asft_repro.losses.token_stats) and the λ its loss used."""
        self.last_used = coef
        self._kl_sum += sums.get(self._kl_key, 0.0)
        self._tokens += sums.get("num_tokens", 0.0)

    def on_train_begin(self, args, state, control, **kwargs):
        """Restore λ from a resumed checkpoint's trainer_state.json (a fresh start holds this callback's own state)."""
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict) and "coef" in saved.get("attributes", {}):
            self.coef = float(saved["attributes"]["coef"])
        # a checkpoint saved before this callback existed: without an entry the Trainer's next save raises KeyError
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        self._kl_sum = self._tokens = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        if self.schedule == "adaptive":
            kl_sum, tokens = all_rank_sum([self._kl_sum, self._tokens], args.device)
            if tokens > 0:
                s = self.settings
                self.coef = adaptive_coef(self.coef, kl_sum / tokens, s["kl_target"], s["kl_horizon"],
                                          s["kl_coef_min"], s["kl_coef_max"])
        self._kl_sum = self._tokens = 0.0

    def state(self) -> dict[str, Any]:
        return {"args": dict(self.settings), "attributes": {"coef": self.coef}}
