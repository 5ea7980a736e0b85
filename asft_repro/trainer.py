"""``ASFTTrainer``: the transformers Trainer with the SFT/DFT/ASFT loss and KL logging."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from asft_repro.config import MethodConfig
from asft_repro.losses import loss_and_token_sums, summarize
from asft_repro.reference import prepare_reference_model


class NonFiniteLossError(FloatingPointError):
    """Raised when a step's loss is NaN/inf, before the optimiser applies it."""


class ASFTTrainer(Trainer):
    """Trainer whose ``compute_loss`` is :func:`asft_repro.losses.compute_loss`.

    The loss is a sum over response tokens divided by the token count of the whole
    accumulated (and, across devices, gathered) batch, so it is already scaled for
    gradient accumulation. Token sums of every metric are accumulated between logging
    steps and reduced across processes, then logged with the Trainer's own ``log``.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, method: MethodConfig, base_model: torch.nn.Module | None = None,
                 loss_chunk_rows: int = 1024, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.method = method
        self.loss_chunk_rows = loss_chunk_rows
        self.base_model = prepare_reference_model(base_model, self.accelerator) if base_model is not None else None
        self._metric_sums: dict[str, float] = defaultdict(float)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}
        outputs = model(**model_inputs, use_cache=False)
        base_logits = None
        if self.base_model is not None:
            with torch.no_grad():
                base_logits = self.base_model(**model_inputs, use_cache=False).logits
        loss, sums = loss_and_token_sums(
            outputs.logits, labels, self.method.name, base_logits=base_logits, kl_coef=self.method.kl_coef,
            kl_direction=self.method.kl_direction, num_items=num_items_in_batch, chunk_rows=self.loss_chunk_rows,
        )
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        if not all(math.isfinite(v) for v in sums.values()):
            raise NonFiniteLossError(f"non-finite loss at step {self.state.global_step} ({summarize(sums)}); "
                                     f"lower train.learning_rate, or use model.dtype=bfloat16 instead of float16")
        if model.training:
            for key, value in sums.items():
                self._metric_sums[key] += value
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metric_sums and "loss" in logs:
            keys = sorted(self._metric_sums)
            totals = torch.tensor([self._metric_sums[k] for k in keys], dtype=torch.float64, device=self.args.device)
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            logs.update({k: round(v, 6) for k, v in summarize(dict(zip(keys, totals.tolist()))).items()})
            self._metric_sums.clear()
        super().log(logs, start_time)


class JsonlMetricsCallback(TrainerCallback):
    """Appends every log (step, epoch, loss, ce, dft, kl_*, ess, lr, grad norm) to metrics.jsonl."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")
