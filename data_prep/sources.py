"""Load a dataset from the hub or from a local copy; fail with one line naming the fix."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import datasets
import pyarrow.parquet as pq

from asft_repro.errors import ProjectError


class PrepError(ProjectError, RuntimeError):
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
    raise PrepError(f"no local copy of '{spec.hub_id}' in {root}; put it at one of {', '.join(str(c) for c in candidates[:3])} "
                    f"(JSONL, parquet or a save_to_disk folder)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__


def check_local_dir(local_dir: str | None) -> None:
    """PrepError unless ``local_dir`` is unset or an existing folder."""
    if local_dir and not Path(local_dir).is_dir():
        what = "is a file, not a folder" if Path(local_dir).exists() else "does not exist"
        raise PrepError(f"local_dir={local_dir} {what}; pass the folder holding the local copies "
                        f"(layout in conf/prep/sources.yaml), or drop local_dir to load from the hub")


def check_jsonl(path: Path) -> None:
    """Stream ``path`` with ``json``: PrepError naming the line if one is not a JSON object, or if it has no rows."""
    rows = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError as err:  # UnicodeDecodeError included
                raise PrepError(f"{path}:{number}: not valid JSON ({_first_line(err)}); fix or delete that line, "
                                f"or re-download the file") from None
            if not isinstance(row, dict):
                raise PrepError(f"{path}:{number}: a JSON {type(row).__name__}, not an object; "
                                f"the file must hold one JSON object per line")
            rows += 1
    if not rows:
        raise PrepError(f"{path} is empty (no rows); re-download it")


def check_parquet(path: Path) -> None:
    """PrepError unless ``path`` is a readable parquet file with rows."""
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except (OSError, ValueError) as err:
        raise PrepError(f"{path} is not a readable parquet file ({_first_line(err)}); re-download it") from None
    if not rows:
        raise PrepError(f"{path} is empty (no rows); re-download it")


@contextmanager
def _quiet() -> Iterator[None]:
    """No datasets progress bars while a local copy is read (it takes a moment; stderr stays for errors)."""
    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def _read_local(path: Path, split: str) -> datasets.Dataset:
    """A local file (checked first, so a broken one fails with one line) or save_to_disk folder."""
    if path.is_file():
        kind = "parquet" if path.suffix == ".parquet" else "json"
        if kind == "parquet":
            check_parquet(path)
        else:
            check_jsonl(path)
        try:
            with _quiet():
                return datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as err:  # e.g. a field with different types in different rows
            raise PrepError(f"{path} could not be read as a table ({_first_line(err)}); re-download it") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise PrepError(f"{path} is not a datasets save_to_disk folder ({_first_line(err)}); "
                        f"put a .jsonl or .parquet file there instead") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise PrepError(f"{path} has no '{split}' split (it has {', '.join(loaded)}); save that split")
        return loaded[split]
    return loaded


def check_fields(rows: datasets.Dataset, needed: Iterable[str], where: str) -> None:
    """PrepError naming the fields found and the ones expected, unless every needed field is a column."""
    missing = [name for name in needed if name not in rows.column_names]
    if missing:
        raise PrepError(f"{where}: no field {', '.join(repr(m) for m in missing)} (fields found: "
                        f"{', '.join(rows.column_names) or 'none'}); use a copy in the hub schema (see conf/prep/sources.yaml)")


def load_rows(spec: Any, local_dir: str | None, fields: Iterable[str] = ()) -> datasets.Dataset:
    """Rows of one source: a local copy when ``local_dir`` is set, else the hub; checked to hold ``fields``."""
    rows = _load_rows(spec, local_dir)
    check_fields(rows, fields, describe(spec, local_dir))
    return rows


def _load_rows(spec: Any, local_dir: str | None) -> datasets.Dataset:
    if local_dir:
        check_local_dir(local_dir)
        return _read_local(find_local(spec, local_dir), spec.split)
    try:
        return datasets.load_dataset(spec.hub_id, spec.get("config"), split=spec.split,
                                     data_files=spec.get("data_files"), revision=spec.get("revision"))
    except Exception as err:  # network, auth, missing dataset: all need the same fix
        first = _first_line(err)
        raise PrepError(f"could not load '{spec.hub_id}' from the hub ({first}); download it where the hub is reachable "
                        f"and pass local_dir=DIR holding {spec.get('local_name') or spec.hub_id.split('/')[-1]}.jsonl "
                        f"(or .parquet, or a save_to_disk folder)") from None

