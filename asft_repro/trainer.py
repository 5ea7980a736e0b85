"""``ASFTTrainer``: the transformers Trainer with the SFT/DFT/ASFT loss and KL logging."""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from asft_repro import lora
from asft_repro.anchor_cache import AnchorRows, completed_base_logits
from asft_repro.config import MethodConfig
from asft_repro.diskspace import disk_full_message, is_disk_full
from asft_repro.errors import ProjectError
from asft_repro.fsdp import ShardLayout, retied, shard_on_cpu
from asft_repro.jsonl import append_jsonl
from asft_repro.kl_controller import KLController
from asft_repro.fused_head import (FusedLoss, auto_chunk_rows, decoder_and_head, enable_fused_head,
                                   response_hidden, supports_fused_head)
from asft_repro.losses import loss_and_token_sums, summarize, token_stats
from asft_repro.reference import prepare_reference_model
from asft_repro.rundir import RunDirError


log = logging.getLogger("asft_repro.train")
COLLAPSE_PATIENCE = 5  # consecutive logging steps at the uniform floor / with zero gradient


class NonFiniteLossError(ProjectError, FloatingPointError):
    """Raised when a step's loss is NaN/inf, before the optimiser applies it."""


class ASFTTrainer(Trainer):
    """Trainer whose loss is SFT / DFT / ASFT (``method``): by default from the response-only fused head
    (:mod:`asft_repro.fused_head`), else from full logits (:func:`asft_repro.losses.loss_and_token_sums`, the
    chunked logits-level function behind :func:`asft_repro.losses.compute_loss`), both on the same per-chunk math.

    The loss is a sum over response tokens divided by ``num_items_in_batch``, the token count
    of the whole accumulated (and, across devices, gathered) batch. The model's forward never
    sees loss kwargs, so whether it accepts them is irrelevant: the Trainer is told to always
    count the tokens, and it then treats the loss as scaled for gradient accumulation exactly
    when it passed the count. Token sums of every metric are accumulated between logging
    steps and reduced across processes, then logged with the Trainer's own ``log``.
    """

    def __init__(self, *args: Any, method: MethodConfig, base_model: torch.nn.Module | None = None,
                 loss_chunk_rows: int | None = None, fused_head: bool = True, anchor_cache: Any = None,
                 adapter_anchor: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # compute_loss, not the model, takes num_items_in_batch
        for callback in (PrinterCallback, ProgressCallback):  # the console gets ConsoleLogCallback's lines
            self.remove_callback(callback)
        self.method = method
        # None: each path sizes its chunks itself (the fused head by whether the step has an anchor)
        self.loss_chunk_rows = loss_chunk_rows
        # before accelerate wraps forward (autocast, DDP / FSDP2), so the fused call goes through the wrappers
        self.fused_head = fused_head and supports_fused_head(self.model) and not self.is_deepspeed_enabled
        if self.fused_head:
            enable_fused_head(self.model)
        self.base_model = prepare_reference_model(base_model, self.accelerator) if base_model is not None else None
        # peft: the base is this very model with its adapters off (asft_repro/lora.py), no second copy
        self.adapter_anchor = adapter_anchor and self.base_model is None and anchor_cache is None
        # method.anchor=cache: the base's top-k rows come from an AnchorCache (asft_repro/anchor_cache.py), no base model
        self.anchor_cache = anchor_cache if self.base_model is None else None
        self._metric_sums: dict[str, float] = defaultdict(float)
        # λ in force per optimizer step (method.kl_schedule, asft_repro/kl_schedule.py); None without a KL term
        self.kl_control = KLController.from_method(method) if method.uses_kl else None
        if self.kl_control is not None:
            self.add_callback(self.kl_control)
        strategy = "fsdp2" if self.is_fsdp_enabled else "zero3" if self.is_deepspeed_enabled else "ddp"
        self.add_callback(ShardLayout(strategy, self.args.world_size, sharded=self.is_fsdp_enabled))

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator; on CPU gloo ranks with ``fsdp`` set, FSDP2 as on GPUs (asft_repro.fsdp)."""
        super().create_accelerator_and_postprocess()
        if shard_on_cpu(self.accelerator, self.args.fsdp_plugin_args):
            self.is_fsdp_enabled = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (internal calls) stay sharded per rank under FSDP2; an explicit save (final/) gathers the
        full state dict once (a collective), and rank 0 writes one Hugging Face folder (under peft: the merged model
        and adapter/, :func:`asft_repro.lora.save_final`)."""
        if not _internal_call and lora.is_peft(self.model):
            state_dict = self.accelerator.get_state_dict(self.model) if self.is_fsdp_enabled else self.model.state_dict()
            if self.args.should_save:
                folder = output_dir or self.args.output_dir
                lora.save_final(self.model, retied(state_dict, self.model), folder)
                self.processing_class.save_pretrained(folder)
            return None
        if not self.is_fsdp_enabled or _internal_call:
            return super().save_model(output_dir, _internal_call)
        state_dict = self.accelerator.get_state_dict(self.model)  # full tensors on rank 0, {} elsewhere
        if self.args.should_save:  # Trainer._save: the writer save_model itself uses (weights, tokenizer, args)
            self._save(output_dir or self.args.output_dir, state_dict=retied(state_dict, self.model))

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint save; a full disk ends the run as one RunDirError line, and the partial folder is
        removed (rank 0) so the last complete checkpoint is the one a resume finds."""
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except Exception as err:
            if not is_disk_full(err):
                raise
            if self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            raise RunDirError(disk_full_message(folder.name, folder.parent, "rerun with train.resume=true (it continues "
                                                "from the last complete checkpoint)")) from err

    def _cached_anchor(self, inputs: dict) -> AnchorRows | None:
        """The batch's cached base rows (by the collator's ``record_key``), or None without a cache."""
        if self.anchor_cache is None:
            return None
        keys = inputs.get("record_key")
        if keys is None:
            raise ValueError("method.anchor=cache needs the dataset's record_key column (asft_repro.data.load_train_dataset) "
                             "passed through the collator (asft_repro.data.PadCollator or "
                             "asft_repro.padding_free.PaddingFreeCollator)")
        return self.anchor_cache.rows(keys.tolist())

    def _fused_loss(self, model, model_inputs: dict, labels: torch.Tensor,
                    anchor: AnchorRows | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Row losses from hidden states (no [B, T, V] logits), the base's hidden rows computed without grad
        (or, with ``anchor``, its cached top-k rows)."""
        base_hidden = base_head = None
        base = self._anchor_model(model)
        if base is not None:
            with torch.no_grad(), self._anchor_context(model):
                base_hidden = response_hidden(base, labels=labels, **model_inputs)
            base_head = decoder_and_head(base)[1]  # under peft: the policy's own (frozen) head
        request = FusedLoss(labels, self.method.name, base_hidden, base_head, self._kl_coef(),
                            self.method.kl_direction, self.loss_chunk_rows, anchor=anchor)
        loss_rows, stats = model(**model_inputs, from_hidden=request)
        return loss_rows.sum(), token_stats(stats, has_base=base_hidden is not None or anchor is not None)

    def _logits_loss(self, model, model_inputs: dict, labels: torch.Tensor,
                     anchor: AnchorRows | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The logits-level path (:func:`asft_repro.losses.compute_loss`, summed), for models the fused head does not cover."""
        logits = model(**model_inputs, use_cache=False).logits
        chunk_rows = self.loss_chunk_rows or auto_chunk_rows(logits.shape[-1])
        base_logits = None
        base = self._anchor_model(model)
        if base is not None:
            with torch.no_grad(), self._anchor_context(model):
                base_logits = base(**model_inputs, use_cache=False).logits
        elif anchor is not None:
            with torch.no_grad():
                base_logits = completed_base_logits(logits, labels, anchor.to(logits.device), chunk_rows)
        return loss_and_token_sums(logits, labels, self.method.name, base_logits=base_logits, kl_coef=self._kl_coef(),
                                   kl_direction=self.method.kl_direction, num_items=1, chunk_rows=chunk_rows)

    # ---- peft (asft_repro/lora.py): the anchor is the model itself with its adapters off ----
    def _anchor_model(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The model giving the base distribution: the frozen base, ``model`` itself under peft, or None."""
        return model if self.adapter_anchor else self.base_model

    def _anchor_context(self, model: torch.nn.Module):
        return lora.adapter_off(model) if self.adapter_anchor else nullcontext()
    # ---- end peft ----

    def _kl_coef(self) -> float:
        """λ for this optimizer step: the schedule's (``method.kl_schedule``), or ``method.kl_coef`` without a KL term."""
        if self.kl_control is None:
            return self.method.kl_coef
        return self.kl_control.coef_at(self.state.global_step, self.state.max_steps)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}
        if "position_ids" in inputs:  # a padding-free packed row (asft_repro/padding_free.py): policy and base alike
            model_inputs["position_ids"] = inputs["position_ids"]
        anchor = self._cached_anchor(inputs)
        if self.fused_head:
            loss_sum, sums = self._fused_loss(model, model_inputs, labels, anchor)
        else:
            loss_sum, sums = self._logits_loss(model, model_inputs, labels, anchor)
        loss = loss_sum / (num_items_in_batch if num_items_in_batch is not None else max(sums["num_tokens"], 1.0))
        outputs = None
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        if not all(math.isfinite(v) for v in sums.values()):
            fp16 = " (or use model.dtype=bfloat16 instead of float16)" if self.args.fp16 else ""
            raise NonFiniteLossError(f"non-finite loss at step {self.state.global_step} ({summarize(sums)}); "
                                     f"lower train.learning_rate{fp16}")
        if model.training:
            for key, value in sums.items():
                self._metric_sums[key] += value
            if self.kl_control is not None:  # the λ used (logged) and this step's KL sums (the adaptive input)
                self.kl_control.add(sums, self._kl_coef())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metric_sums and "loss" in logs:
            keys = sorted(self._metric_sums)
            totals = torch.tensor([self._metric_sums[k] for k in keys], dtype=torch.float64, device=self.args.device)
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            logs.update({k: round(v, 6) for k, v in summarize(dict(zip(keys, totals.tolist()))).items()})
            self._metric_sums.clear()
            if self.kl_control is not None:
                logs["kl_coef"] = self.kl_control.last_used  # the λ of the latest optimizer step
        super().log(logs, start_time)

    def collapse_reason(self) -> str | None:
        monitor = next((c for c in self.callback_handler.callbacks if isinstance(c, CollapseMonitor)), None)
        return monitor.reason if monitor else None


class JsonlMetricsCallback(TrainerCallback):
    """Appends every log (step, epoch, loss, ce, dft, kl_*, ess, lr, grad norm) to metrics.jsonl (rank 0)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_jsonl(self.path, [{"step": state.global_step, "epoch": state.epoch, **logs}])


CONSOLE_FIELDS = [("loss", "loss", ".4f"), ("ce", "ce", ".4f"), ("dft", "dft", ".4f"), ("kl_forward", "kl", ".4f"),
                  ("kl_coef", "λ", ".4g"),
                  ("dft_weight_ess", "ess", ".3f"), ("token_prob_mean", "p", ".3f"), ("learning_rate", "lr", ".2e"),
                  ("grad_norm", "gnorm", ".3f")]


class ConsoleLogCallback(TrainerCallback):
    """One concise line per logging step (``step 12/96 | loss 0.41 | ce 1.9 | kl 0.003 | ...``), via logging."""

    def __init__(self) -> None:
        self._last: tuple[int, float] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            log.info("%d optimizer steps | global batch %d = %d per device x %d ranks x %d accumulation",
                     state.max_steps, args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps,
                     args.per_device_train_batch_size, args.world_size, args.gradient_accumulation_steps)
        self._last = (state.global_step, time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        parts = [f"step {state.global_step}/{state.max_steps}"]
        parts += [f"{short} {logs[key]:{fmt}}" for key, short, fmt in CONSOLE_FIELDS if isinstance(logs.get(key), (int, float))]
        now = time.perf_counter()
        if self._last and state.global_step > self._last[0]:
            parts.append(f"{(now - self._last[1]) / (state.global_step - self._last[0]):.2f} s/step")
        self._last = (state.global_step, now)
        log.info(" | ".join(parts))


class CollapseMonitor(TrainerCallback):
    """Flags a run whose model collapsed for ``patience`` logging steps in a row: token probability at the
    uniform floor, cross-entropy worse than a uniform guess (log V + 1 nat), or a zero gradient."""

    def __init__(self, vocab_size: int, patience: int = COLLAPSE_PATIENCE) -> None:
        self.floor = 2.0 / vocab_size
        self.worse_than_uniform = math.log(vocab_size) + 1.0
        self.patience = patience
        self.streak = 0
        self.reason: str | None = None

    def _symptom(self, logs: dict[str, float]) -> str | None:
        if logs.get("token_prob_mean", 1.0) <= self.floor:
            return "mean token probability at the uniform floor"
        if logs.get("ce", 0.0) > self.worse_than_uniform:
            return f"cross-entropy above a uniform guess (> {self.worse_than_uniform:.2f})"
        if logs.get("grad_norm") == 0.0:
            return "zero gradient norm"
        return None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "ce" not in logs:
            return
        symptom = self._symptom(logs)
        self.streak = self.streak + 1 if symptom else 0
        if self.streak >= self.patience and self.reason is None:
            self.reason = (f"{symptom} for {self.streak} logging steps up to step {state.global_step}; "
                           f"lower train.learning_rate")


def training_callbacks(metrics_path: Path, vocab_size: int) -> list[TrainerCallback]:
    return [JsonlMetricsCallback(metrics_path), ConsoleLogCallback(), CollapseMonitor(vocab_size)]
