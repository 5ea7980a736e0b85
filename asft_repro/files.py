"""Files that a kill never leaves half-written, content hashes, and the one fingerprint of a model's weights."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, payload: Any) -> None:
    """``payload`` as indented JSON at ``path``: written to a temp name of this process, then renamed into place."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def short_hash(payload: Any, n: int = 12) -> str:
    """The first ``n`` hex characters of the sha256 of ``payload`` as sorted-key JSON (values str()-ed if need be)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:n]


def model_fingerprint(path: str) -> dict[str, Any]:
    """What decides "the same model" for every cache (the anchor cache, eval records).

    A local folder: each weight file's name, size and mtime, and config.json's sha256 (not the folder's path, so a
    moved folder keeps its fingerprint; a retrained one gets new mtimes). A hub id: the id and the revision of its
    locally cached snapshot.
    """
    folder = Path(path)
    if folder.is_dir():
        weights = {p.name: {"bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                   for pattern in WEIGHT_PATTERNS for p in sorted(folder.glob(pattern)) if p.is_file()}
        config = folder / "config.json"
        return {"weights": dict(sorted(weights.items())), "config_sha256": sha256_file(config) if config.exists() else None}
    return {"hub_id": path, "revision": _hub_revision(path)}


def _hub_revision(hub_id: str) -> str | None:
    """The commit of the locally cached snapshot of ``hub_id`` (None when it is not cached)."""
    from huggingface_hub import try_to_load_from_cache  # deferred: hub client start-up, only for hub ids

    try:
        cached = try_to_load_from_cache(hub_id, "config.json")
    except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError): no cached snapshot
        return None
    return Path(cached).parent.name if isinstance(cached, str) else None  # .../snapshots/<commit>/config.json


def sha256_file(path: Path) -> str:
    """The file's sha256, read in 4 MB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
