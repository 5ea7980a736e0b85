"""Pre-emption: a signal ends training at the next optimizer step with a complete checkpoint, then a one-line error.

SLURM sends SIGTERM before it kills a pre-empted job, ``sbatch --signal`` SIGUSR1 ahead of the time limit, and
submitit its own signal (``SUBMITIT_PREEMPT_SIGNAL``, USR2 by default; conf/hydra/launcher/slurm.yaml sets the
lead time). :class:`Preemption` is a TrainerCallback whose handler, installed while ``trainer.train`` runs
(:meth:`Preemption.installed`), only sets a flag and restores the default handlers, so a second signal during
the save kills at once (the previous checkpoint then stays the last complete one). At the end of the step the
flag (agreed by all ranks: a max all-reduce) makes the Trainer save ``checkpoint-N`` and stop; then
:meth:`Preemption.stop_if_preempted` marks run.json ``train_status: "preempted"`` (rank 0), hands the signal to
the handler it displaced (submitit's requeue), and raises :class:`PreemptedError` on every rank.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import TrainerCallback

from asft_repro import distributed
from asft_repro.rundir import RunDirError, write_record

log = logging.getLogger(__name__)


def watched_signals() -> list[signal.Signals]:
    """SIGTERM, SIGUSR1 and submitit's pre-emption signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    submitit = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
    return list(dict.fromkeys([signal.SIGTERM, signal.SIGUSR1, submitit]))


class PreemptedError(RunDirError):
    """Training stopped on a pre-emption signal after saving a complete checkpoint; resume continues it."""


class Preemption(TrainerCallback):
    """Save and stop at the end of the step in which a pre-emption signal arrived (see the module docstring)."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the signal this rank received
        self.step: int | None = None  # the step whose checkpoint was saved
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        for sig in self._previous:
            signal.signal(sig, signal.SIG_DFL)  # a second signal kills at once

    @contextlib.contextmanager
    def installed(self) -> Iterator["Preemption"]:
        """The handler on the watched signals for the duration of the block (main thread only), then the old ones."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in watched_signals()}
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def on_step_end(self, args, state, control, **kwargs):
        flag = self.signum is not None
        if args.world_size > 1:  # every rank saves and stops at the same step
            agreed = torch.tensor([int(flag)], device=args.device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
            flag = bool(agreed.item())
        if flag:
            self.step = state.global_step
            control.should_save = True
            control.should_training_stop = True
            if state.is_world_process_zero:
                log.warning("pre-emption signal: saving checkpoint-%d and stopping", state.global_step)
        return control

    def stop_if_preempted(self, out: Path) -> None:
        """After ``trainer.train``: nothing if no signal came; else mark run.json, chain the signal, raise."""
        if self.step is None:
            return
        name = signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"
        distributed.on_main(write_record, out, train_status="preempted", preempted_at_step=self.step)
        previous = self._previous.get(self.signum) if self.signum is not None else None
        if callable(previous):  # e.g. submitit's handler, which requeues the job
            previous(self.signum, None)
        raise PreemptedError(f"pre-empted ({name}) at step {self.step}: checkpoint-{self.step} in {out} is complete; "
                             f"rerun with train.resume=true to continue from it")
