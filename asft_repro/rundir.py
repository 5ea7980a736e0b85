"""Run-directory bookkeeping: refuse to clobber results, resume cleanly, mark completion."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers.trainer_utils import get_last_checkpoint

RUN_RECORD = "run.json"
METRICS_FILE = "metrics.jsonl"


class RunDirError(RuntimeError):
    """The run directory holds results this invocation must not overwrite."""


def read_record(out: Path) -> dict[str, Any]:
    path = out / RUN_RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def write_record(out: Path, **fields: Any) -> None:
    record = {**read_record(out), **fields}
    tmp = out / (RUN_RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(out / RUN_RECORD)


def last_checkpoint(out: Path) -> str | None:
    return get_last_checkpoint(str(out)) if out.is_dir() else None


def check_run_dir(out: Path, resume: bool) -> None:
    """Raise unless ``out`` is new, or ``resume`` is set for a run that has something in it."""
    if resume:
        return
    if read_record(out).get("train_status") == "complete":
        raise RunDirError(f"{out} already holds a finished run; pass train.resume=true to reuse it "
                          f"(evaluation still missing is then run), or choose another experiment_name")
    if last_checkpoint(out) or (out / METRICS_FILE).exists():
        raise RunDirError(f"{out} holds an unfinished run; pass train.resume=true to continue it from its last "
                          f"checkpoint, or delete the directory to start over")


def trim_metrics(out: Path, up_to_step: int) -> None:
    """Drop metrics.jsonl rows logged after the checkpoint a resumed run restarts from."""
    path = out / METRICS_FILE
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= up_to_step]
    path.write_text("".join(line + "\n" for line in kept))
