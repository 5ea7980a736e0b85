"""Load a dataset from the hub or from a local copy; fail with one line naming the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets


class PrepError(RuntimeError):
    """A data-preparation problem the user fixes (one line, names the fix)."""


def describe(spec: Any, local_dir: str | None) -> str:
    """Where a source is read from, for manifests and messages."""
    return str(find_local(spec, local_dir)) if local_dir else f"hub:{spec.hub_id}" + (f"/{spec.config}" if spec.get("config") else "")


def find_local(spec: Any, local_dir: str) -> Path:
    """The local copy of ``spec`` under ``local_dir`` (file or folder), or a PrepError."""
    root = Path(local_dir)
    name = spec.get("local_name") or spec.hub_id.split("/")[-1]
    config = spec.get("config")
    candidates = [root / f"{name}.jsonl", root / f"{name}.parquet", root / name / f"{spec.split}.jsonl",
                  root / name / f"{spec.split}.parquet", root / name]
    if config:  # e.g. mmlu_<subject>
        candidates = [root / f"{name}_{config}.jsonl", root / f"{name}_{config}.parquet"] + candidates
    for path in candidates:
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            return path
    raise PrepError(f"no local copy of '{spec.hub_id}' in {root}: expected one of {', '.join(str(c) for c in candidates[:3])} "
                    f"(JSONL, parquet or a save_to_disk folder)")


def _read_local(path: Path, split: str) -> datasets.Dataset:
    if path.is_file():
        kind = "parquet" if path.suffix == ".parquet" else "json"
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    loaded = datasets.load_from_disk(str(path))
    return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded


def load_rows(spec: Any, local_dir: str | None) -> datasets.Dataset:
    """Rows of one source: a local copy when ``local_dir`` is set, else the hub."""
    if local_dir:
        return _read_local(find_local(spec, local_dir), spec.split)
    try:
        return datasets.load_dataset(spec.hub_id, spec.get("config"), split=spec.split,
                                     data_files=spec.get("data_files"), revision=spec.get("revision"))
    except Exception as err:  # network, auth, missing dataset: all need the same fix
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise PrepError(f"could not load '{spec.hub_id}' from the hub ({first}); download it where the hub is reachable "
                        f"and pass local_dir=DIR holding {spec.get('local_name') or spec.hub_id.split('/')[-1]}.jsonl "
                        f"(or .parquet, or a save_to_disk folder)") from None

