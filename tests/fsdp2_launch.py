"""Test harness run under torchrun (tests/test_fsdp2.py): several jobs in ONE launch (each launch costs every rank
seconds of imports). A training job goes through the product's ``asft_repro.train.run`` exactly as the CLI calls it
(set-up, train, save, tear-down); a ``units`` job runs tests/rank_units.py on the group; a ``memcheck`` job is
``python -m asft_repro.memcheck``'s per-rank measurement (give it first: it measures memory over this process's
state before it).

    torchrun --nproc_per_node 2 tests/fsdp2_launch.py JOBS.json

JOBS.json, run in order: ``{"overrides": [...], "kill_after_save": null | STEP}`` (train; ``kill_after_save`` SIGKILLs
every rank right after the checkpoint of that step is written, a pre-empted job: give it to the last job),
``{"units": OUT_PREFIX, "model_dir": DIR}``, ``{"memcheck": SPEC, "result": FILE}`` (rank 0 writes the result) or ``{"killed_copy": RUN, "to": DIR}`` (a
finished run copied as if killed after its last checkpoint: no final/, run.json still "running").

Between jobs the process group is kept: torch cannot create the default group a second time against torchrun's
agent store (the same "default_pg" key prefix; the second ``init_process_group`` hangs), so ``distributed.teardown``
is replaced by its part that resets accelerate's state, and the group is destroyed once, at the end.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asft_repro.train as train_module  # noqa: E402
from asft_repro import distributed, memcheck  # noqa: E402
from conftest import compose_config  # noqa: E402
import rank_units  # noqa: E402


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


def train(job: dict) -> None:
    kill, real_callbacks = job.get("kill_after_save"), train_module.training_callbacks
    if kill:
        train_module.training_callbacks = lambda *a: real_callbacks(*a) + [KillAfterSave(kill)]
    try:
        train_module.run(compose_config("config", job["overrides"]))
    finally:
        train_module.training_callbacks = real_callbacks


def killed_copy(run: str, to: str) -> None:
    if torch.distributed.get_rank() == 0:
        shutil.copytree(run, to)
        shutil.rmtree(Path(to) / "final")
        record = Path(to) / "run.json"
        record.write_text(json.dumps({**json.loads(record.read_text()), "train_status": "running"}))
    torch.distributed.barrier()


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    gc.freeze()  # as the CLIs do (asft_repro.hydra_cli.process_main): each job's full collections skip the imported libraries
    real_teardown, distributed.teardown = distributed.teardown, keep_group
    for job in jobs:
        if "units" in job:
            for var in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING"):  # an fsdp2 job's: rank-0-only loading
                os.environ.pop(var, None)
            distributed.setup()
            rank_units.run(job["units"], job["model_dir"])
        elif "killed_copy" in job:
            killed_copy(job["killed_copy"], job["to"])
        elif "memcheck" in job:
            result = memcheck.measure_rank(job["memcheck"])
            if torch.distributed.get_rank() == 0:
                Path(job["result"]).write_text(json.dumps(result))
        else:
            train(job)
    real_teardown()


if __name__ == "__main__":
    main()
