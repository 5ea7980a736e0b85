"""Test harness run under torchrun (tests/test_fsdp2.py): several training runs in ONE launch, each through the
product's ``asft_repro.train.run`` exactly as the CLI calls it (set-up, train, save, tear-down).

    torchrun --nproc_per_node 2 tests/fsdp2_launch.py JOBS.json

JOBS.json: ``[{"overrides": [...], "kill_after_save": null | STEP}, ...]``, run in order. ``kill_after_save``
SIGKILLs every rank right after the checkpoint of that step is written (a pre-empted job); give it to the last job.

Between jobs the process group is kept: torch cannot create the default group a second time against torchrun's
agent store (the same "default_pg" key prefix; the second ``init_process_group`` hangs), so ``distributed.teardown``
is replaced by its part that resets accelerate's state, and the group is destroyed once, at the end.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asft_repro.train as train_module  # noqa: E402
from asft_repro import distributed  # noqa: E402
from conftest import compose_config  # noqa: E402


class KillAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def keep_group(synchronize: bool = True) -> None:
    if synchronize:
        torch.distributed.barrier()
    PartialState._reset_state()


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    real_teardown, distributed.teardown = distributed.teardown, keep_group
    real_callbacks = train_module.training_callbacks
    for job in jobs:
        kill = job.get("kill_after_save")
        train_module.training_callbacks = (lambda *a, _k=kill: real_callbacks(*a) + [KillAfterSave(_k)]) if kill \
            else real_callbacks
        train_module.run(compose_config("config", job["overrides"]))
    real_teardown()


if __name__ == "__main__":
    main()
