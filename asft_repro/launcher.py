"""hydra-submitit's SLURM launcher, refusing a job layout that cannot run one rank per GPU.

``conf/hydra/launcher/slurm.yaml`` points ``_target_`` here. The check runs on the submitting
machine, before any job waits in the queue.
"""

from __future__ import annotations

from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher

from asft_repro.config import ConfigError


def check_job_layout(params: dict[str, Any]) -> None:
    """tasks_per_node must equal gpus_per_node: each task is one rank driving one GPU."""
    gpus, tasks = params.get("gpus_per_node"), params.get("tasks_per_node", 1)
    if gpus and tasks != gpus:
        raise ConfigError(f"hydra.launcher.tasks_per_node={tasks} but gpus_per_node={gpus}: each SLURM task is one "
                          f"rank on one GPU; set hydra.launcher.tasks_per_node={gpus} (or leave it at its default, "
                          f"${{.gpus_per_node}})")
    if params.get("gpus_per_task") not in (None, 1):
        raise ConfigError(f"hydra.launcher.gpus_per_task={params['gpus_per_task']}: one rank drives one GPU; "
                          f"leave it unset and set gpus_per_node")


class SlurmLauncher(SubmititSlurmLauncher):
    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        check_job_layout(self.params)
