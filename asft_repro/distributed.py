"""One process per GPU, whatever launched us: torchrun, accelerate launch, or a SLURM / submitit task.

``setup()`` exports torch.distributed's variables from a submitit job (each task = one rank),
refuses launches that would fall back to ``nn.DataParallel``, and creates accelerate's
``PartialState`` so the process group exists before any model is loaded. ``on_main`` runs
bookkeeping on rank 0 and re-raises its error on every rank, so no rank waits forever.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, TypeVar

import torch
from accelerate import PartialState
from submitit.helpers import TorchDistributedEnvironment

from asft_repro.config import ConfigError

T = TypeVar("T")
# Variables a child process (evaluation) must not inherit, or it would try to join this job.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
             "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
             "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE",
             "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_CPU_RAM_EFFICIENT_LOADING")


def export_submitit_env() -> bool:
    """Inside a submitit task (SLURM or local executor): set RANK / WORLD_SIZE / MASTER_* from the job."""
    if "SUBMITIT_EXECUTOR" not in os.environ or "RANK" in os.environ:
        return False
    env = TorchDistributedEnvironment()
    if env.world_size > 1:
        env.export(set_cuda_visible_devices=False)  # all ranks see the node's GPUs; LOCAL_RANK picks one
    return env.world_size > 1


def check_launch(world_size: int, local_world_size: int, visible_gpus: int) -> None:
    """One rank per GPU: never DataParallel, never more ranks than GPUs on a GPU node."""
    if world_size == 1 and visible_gpus > 1:
        raise ConfigError(
            f"{visible_gpus} GPUs are visible to one training process, which would run nn.DataParallel; launch one "
            f"rank per GPU: `torchrun --nproc_per_node {visible_gpus} -m asft_repro.train ...`, or on SLURM "
            f"hydra/launcher=slurm with hydra.launcher.tasks_per_node = gpus_per_node; or set CUDA_VISIBLE_DEVICES=0")
    if world_size > 1 and visible_gpus and local_world_size != visible_gpus:
        raise ConfigError(
            f"{local_world_size} ranks on this node but {visible_gpus} GPUs visible: set "
            f"hydra.launcher.tasks_per_node = hydra.launcher.gpus_per_node = {visible_gpus} "
            f"(or torchrun --nproc_per_node {visible_gpus})")


def setup() -> PartialState:
    """Join (or start) the process group; validates the launch first."""
    export_submitit_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check_launch(world, local_world, gpus)
    if gpus == 0:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # what TrainingArguments reads to run DDP on gloo
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    state = PartialState(cpu=on_cpu)
    if not state.is_main_process:  # one copy of every console line: rank 0's (warnings and errors from all ranks)
        logging.getLogger().setLevel(logging.WARNING)
    return state


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn`` on rank 0 only; its result (or its exception) reaches every rank."""
    state = PartialState()
    result: Any = None
    error: BaseException | None = None
    if state.is_main_process:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error = err
    if state.num_processes > 1:
        box = [(result, error)]
        torch.distributed.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result


def barrier() -> None:
    state = PartialState()
    if state.num_processes > 1:
        state.wait_for_everyone()


def teardown(synchronize: bool = True) -> None:
    """Leave the process group (a later job in this process, or evaluation, starts clean); ``synchronize`` waits
    for every rank first (not after a failure, when another rank may never arrive)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if synchronize:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    # accelerate keeps its state in a process-wide singleton and offers no public reset; without this a later
    # job in the same process (a local sweep, the tests) would inherit this job's world size and device
    PartialState._reset_state()


def child_env() -> dict[str, str]:
    """This process's environment minus the variables that would make a child join the job."""
    return {k: v for k, v in os.environ.items() if k not in DIST_VARS}
