"""A run's per-sample eval records: which items each benchmark scored, each sample's correctness, the questions.

``<run>/eval/<settings_hash>/<benchmark>.jsonl`` (eval/runner.py) holds one record per item: ``id``,
``benchmark`` (the item's own file: a group's member, e.g. mmlu_anatomy inside mmlu_medical), ``outputs``,
``parsed``, ``correct`` (one per sample) and ``answer``. Items are keyed as the evaluator keys them,
``<benchmark>/<id>``: ids repeat across a group's members. Reading never edits a run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from asft_repro.benchmarks import members
from asft_repro.files import sha256_file
from asft_repro.jsonl import JsonlError, read_jsonl
from asft_repro.paths import REPO_ROOT, benchmark_file

METRICS = ("acc", "mean_acc")  # first sample; each item's mean over its samples
log = logging.getLogger(__name__)


def item_key(record: dict[str, Any]) -> str:
    """``<benchmark>/<id>``, the key eval/runner.py resumes and merges by."""
    return f"{record['benchmark']}/{record['id']}"


def read_records(eval_dir: Path, benchmark: str) -> dict[str, dict[str, Any]]:
    """Item key -> record of ``<eval_dir>/<benchmark>.jsonl`` in file order ({} when absent or damaged);
    a key written twice keeps its last record, as a resumed evaluation does."""
    try:
        records = read_jsonl(eval_dir / f"{benchmark}.jsonl", repair=False)
    except JsonlError as err:
        log.warning("asft_repro.records: skipping %s: %s", eval_dir / f"{benchmark}.jsonl", err)
        return {}
    return {item_key(r): r for r in records if isinstance(r.get("correct"), list) and r["correct"]}


def item_scores(records: dict[str, dict[str, Any]], metric: str) -> dict[str, float]:
    """Item key -> 0/1 of the first sample (``acc``) or the item's mean over its samples (``mean_acc``)."""
    if metric == "acc":
        return {k: float(bool(r["correct"][0])) for k, r in records.items()}
    if metric == "mean_acc":
        return {k: float(np.mean([bool(c) for c in r["correct"]])) for k, r in records.items()}
    raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


def resolve_dir(path: str | Path) -> Path:
    """A configured folder: as given when it exists (relative to the working directory), else under the repository."""
    path = Path(path)
    return path if path.is_absolute() or path.exists() else REPO_ROOT / path


def question_texts(benchmarks_dir: str | Path, benchmark: str, scored_sha256: dict[str, str] | None) -> dict[str, str]:
    """Item key -> question (``prompt``) from ``<benchmarks_dir>/<member>/test.jsonl`` of each member; a member
    whose file is missing, or differs from the one scored (``scored_sha256``: member -> sha256), is left out."""
    texts: dict[str, str] = {}
    for member in members(benchmark):
        path = benchmark_file(resolve_dir(benchmarks_dir), member)
        if not path.is_file():
            continue
        if scored_sha256 and scored_sha256.get(member) not in (None, sha256_file(path)):
            log.warning("asft_repro.records: %s differs from the file that was scored; showing item ids instead", path)
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                texts[f"{row.get('benchmark', member)}/{row.get('id')}"] = str(row.get("prompt", ""))
    return texts
