"""What a sharded (FSDP2, torch.distributed.checkpoint) checkpoint must hold, read from files only (rank 0).

Under ``train.strategy=fsdp2`` each rank writes its own shard of the model and of the optimizer state:
``checkpoint-N/pytorch_model_fsdp_0/`` and ``checkpoint-N/optimizer_0/``, each with DCP's ``.metadata`` (written
by the coordinator once every rank has finished) and one ``__<rank>_0.distcp`` per rank. The layout (strategy,
world size, sharded or not) is recorded in ``trainer_state.json`` by :class:`asft_repro.fsdp.ShardLayout`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LAYOUT_KEY = "ShardLayout"  # the callback's name in trainer_state.json's stateful_callbacks
DCP_DIRS = ("pytorch_model_fsdp_*", "optimizer_*")


def recorded_layout(folder: Path) -> dict[str, Any] | None:
    """``{"strategy", "world_size", "sharded"}`` recorded in the checkpoint; for one saved before layouts were
    recorded, read off its files (DCP folder: fsdp2 over as many ranks as shards); None without a trainer state."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    entry = (state.get("stateful_callbacks") or {}).get(LAYOUT_KEY)
    if isinstance(entry, dict) and isinstance(entry.get("args"), dict):
        return entry["args"]
    model = next((d for d in folder.glob("pytorch_model_fsdp_*") if d.is_dir()), None)
    if model is None:
        return {"strategy": "ddp", "world_size": None, "sharded": False}
    return {"strategy": "fsdp2", "world_size": len(list(model.glob("__*_0.distcp"))), "sharded": True}


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def dcp_problem(folder: Path) -> str | None:
    """Why the DCP shards of a checkpoint are incomplete (None when every rank's shard is there, or none is DCP)."""
    shard_dirs = sorted(d for pattern in DCP_DIRS for d in folder.glob(pattern) if d.is_dir())
    layout = recorded_layout(folder) or {}
    if layout.get("sharded") and not any(d.name.startswith("pytorch_model_fsdp_") for d in shard_dirs):
        return "no pytorch_model_fsdp_0/ (the sharded model)"
    ranks = int(layout.get("world_size") or 1)
    for shard_dir in shard_dirs:
        if not _size(shard_dir / ".metadata"):
            return f"{shard_dir.name}/.metadata missing (the save did not finish)"
        missing = [r for r in range(ranks) if not _size(shard_dir / f"__{r}_0.distcp")]
        if missing:
            return (f"{shard_dir.name}/ lacks the shard of rank {', '.join(map(str, missing))} "
                    f"(__{missing[0]}_0.distcp) of the {ranks} ranks that saved it")
    return None


def _describe(strategy: str, sharded: bool, world_size: int | None) -> str:
    return f"{world_size or 'some'} {strategy} rank(s){' (sharded)' if sharded else ''}"


def layout_change(folder: Path, strategy: str, sharded: bool, world_size: int) -> str | None:
    """Why this launch cannot resume ``folder`` (a sharded checkpoint needs the layout that saved it), else None."""
    saved = recorded_layout(folder)
    if saved is None or not (saved.get("sharded") or sharded):
        return None  # replicated (DDP) checkpoints resume on any world size
    was = (str(saved.get("strategy")), bool(saved.get("sharded")), saved.get("world_size"))
    if was[1] == sharded and was[2] == world_size:
        return None
    size = was[2] or "the original number of"
    return (f"{folder.name} was saved by {_describe(*was)}, this launch has {_describe(strategy, sharded, world_size)}; "
            f"resume with {size} rank(s) and train.strategy={was[0]} (torchrun --nproc_per_node {size}, or "
            f"hydra.launcher gpus_per_node x nodes = {size}), or train into a new output_dir")
