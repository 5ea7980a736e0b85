"""JSON-lines files that survive a kill mid-write: read (repairing a torn tail) and append.

A process killed while appending leaves at most one damaged line, the last one: it is either cut
short (no trailing newline) or not valid JSON. ``read_jsonl`` drops such a last line, truncates the
file back to the end of the last complete line (so the next append starts on a fresh line) and
logs a warning naming the file. Damage anywhere else was not caused by a torn append: it is an
error naming the file and line number.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from asft_repro.errors import ProjectError

log = logging.getLogger(__name__)


class JsonlError(ProjectError, ValueError):
    """A JSONL file is damaged somewhere other than its last line."""


def read_jsonl(path: str | os.PathLike, repair: bool = True) -> list[dict[str, Any]]:
    """Records of ``path`` ([] if it does not exist); a torn last line is dropped (and cut off if ``repair``)."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    # data ends with "\n" -> the last element is b"" (nothing torn); otherwise it is an unterminated tail
    tail = lines.pop()
    keep = len(data) - len(tail)  # bytes up to and including the last newline
    reason = "it has no trailing newline (the write was cut short)" if tail.strip() else None
    last = max((i for i, line in enumerate(lines, start=1) if line.strip()), default=0)
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as err:
            if number == last and reason is None:  # the last, newline-terminated line is torn
                keep = sum(len(x) + 1 for x in lines[:number - 1])
                reason = f"it is not valid JSON ({err})"
                break
            raise JsonlError(f"{path}:{number}: not valid JSON ({err}); the file is damaged before its last line: "
                             f"fix or delete that line (or delete the file to redo it)") from None
    if reason is not None:
        log.warning("%s: dropped its last line, %s; it will be redone", path, reason)
    if repair and keep < len(data):
        with path.open("r+b") as f:
            f.truncate(keep)
    return records


def append_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]], fsync: bool = False) -> None:
    """Append one line per record, flushed (and fsync'ed if asked) before returning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(record) + "\n" for record in records)
    if not text:
        return
    with path.open("a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
