"""wandb: offline by default, grouped by experiment, named and tagged by the swept values."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from pathlib import Path

from asft_repro.config import Config


def run_tags(cfg: Config) -> list[str]:
    tags = [f"method:{cfg.method.name}", f"size:{cfg.data.size}", f"data:{cfg.data.name}", f"model:{cfg.model.name}"]
    if cfg.method.uses_kl:
        tags += [f"lambda:{cfg.method.kl_coef}", f"kl:{cfg.method.kl_direction}"]
        if cfg.method.kl_schedule != "constant":  # λ itself is logged every step as train/kl_coef
            tags.append(f"lambda_schedule:{cfg.method.kl_schedule}")
    return tags


def init_wandb(cfg: Config, out: Path) -> str:
    """Start the run the Trainer's WandbCallback then logs into (WANDB_MODE in the env wins); returns its id."""
    import wandb

    os.environ.setdefault("WANDB_MODE", cfg.wandb.mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    run_id = f"{cfg.experiment_name}-{cfg.run_name}".replace("/", "_")[:120]
    wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, group=cfg.experiment_name, name=cfg.run_name,
               id=run_id, resume="allow", tags=run_tags(cfg), dir=str(out), config=asdict(cfg))
    return run_id


def finish_wandb(failed: bool = False) -> None:
    """Close this process's wandb run if one is open (a failed job's run is marked failed)."""
    if "wandb" not in sys.modules:
        return  # wandb was never imported here: no run to close
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)
