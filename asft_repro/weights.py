"""A saved model's weight files: recorded when published, verified before reuse, checked for tearing before loading.

* :func:`record_weights`: ``{name: {"bytes", "sha256"}}`` of every weight file of a folder (``*.safetensors``,
  ``*.bin``, ``*.pt``, ``*.pth`` and sharded indexes), written into run.json as ``final_files`` when ``final/``
  is published.
* :func:`recorded_problem`: how a folder differs from that record (a file missing, another size, another
  sha256 when ``hashes``); sizes are cheap, the sha256 reads every byte (4 MB blocks).
* :func:`structure_problem`: for a folder with no record (``model_path=...``): a safetensors file shorter than
  its header says, an index naming a missing shard, a torch zip archive without its end record.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any

from asft_repro.files import sha256_file

WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json")


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files (and shard indexes), sorted by name."""
    found = {p for pattern in WEIGHT_GLOBS for p in Path(folder).glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.name)


def record_weights(folder: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": size, "sha256": digest}}`` of :func:`weight_files`."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in weight_files(folder)}


def recorded_problem(folder: Path, recorded: dict[str, dict[str, Any]], hashes: bool = True) -> str | None:
    """Why ``folder`` is not the one ``recorded`` describes (None when it is): the first file that differs."""
    for name, expected in sorted(recorded.items()):
        path = Path(folder) / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path} is {size} bytes, {expected['bytes']} when it was saved (torn or altered)"
        if hashes and sha256_file(path) != expected["sha256"]:
            return f"{path} does not match the sha256 recorded when it was saved (altered)"
    return None


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                return f"{path} is {size} bytes, shorter than its own header says (torn)"
            header = json.loads(f.read(length))
    except (struct.error, ValueError):
        return f"{path} has no readable safetensors header (torn or not a safetensors file)"
    end = max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"), default=0)
    if 8 + length + end != size:
        return f"{path} is {size} bytes, its header describes {8 + length + end} (torn)"
    return None


def structure_problem(folder: Path) -> str | None:
    """A torn or incomplete weight file of ``folder`` found without a record (None when none is found)."""
    for path in weight_files(folder):
        if path.name.endswith(".index.json"):
            try:
                shards = set(json.loads(path.read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError):
                return f"{path} is not a readable shard index"
            missing = sorted(s for s in shards if not (Path(folder) / s).is_file())
            if missing:
                return f"{path} names {len(missing)} missing shard(s), first {Path(folder) / missing[0]}"
        elif path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
            if problem:
                return problem
        elif path.suffix in (".bin", ".pt", ".pth") and path.stat().st_size and not zipfile.is_zipfile(path):
            with path.open("rb") as f:
                if f.read(2) == b"PK":  # a torch zip archive that lost its end: torn
                    return f"{path} is a truncated torch archive (torn)"
    return None
