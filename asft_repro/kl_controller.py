"""The callback that holds λ during training (``method.kl_schedule``; the schedules are asft_repro/kl_schedule.py).

:class:`KLController` is a ``TrainerCallback`` + ``ExportableState``: its λ is saved in every checkpoint's
trainer_state.json (``stateful_callbacks``) and restored on resume, so a resumed run continues the same λ path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from asft_repro.kl_schedule import adaptive_coef, scheduled_coef, warmup_steps


def all_rank_sum(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """``values`` summed over every rank of the default process group (float64); as is with one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    totals = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return totals.tolist()


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
