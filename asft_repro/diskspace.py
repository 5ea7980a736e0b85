"""A full disk, named: what was being written, where, how much space is left, and that the work resumes.

Every writer of large files (checkpoints, ``final/``, eval records, anchor shards) wraps its write in
:func:`naming_disk_errors`; an error that means "no space" (``ENOSPC`` / ``EDQUOT`` OSErrors, torch's
``inline_container.cc`` "unexpected pos" / "file write failed" RuntimeErrors, safetensors' "No space left")
becomes one line of the caller's project error type. Any other error passes through unchanged.

Before training, :func:`warn_if_short` compares the free space of the output filesystem with
:func:`training_footprint`: ``save_total_limit`` checkpoints (weights in their dtype + AdamW's two fp32
moments per parameter) plus ``final/`` (the weights once). A rough lower bound: tokenizer, RNG and
trainer-state files are small and left out.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
NO_SPACE_TEXT = ("no space left", "disk quota exceeded", "unexpected pos", "file write failed", "storagefull")
ADAMW_BYTES = 8  # exp_avg + exp_avg_sq, fp32, per parameter


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) means the filesystem ran out of space or quota."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in NO_SPACE_ERRNOS:
            return True
        if any(text in str(current).lower() for text in NO_SPACE_TEXT):
            return True
        current = current.__cause__ or current.__context__
    return False


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem holding ``path`` (its nearest existing parent); None if unknown."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def gigabytes(n: int | None) -> str:
    """``12.34 GB`` (``5.6 MB`` below a gigabyte)."""
    if n is None:
        return "an unknown amount"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def disk_full_message(what: str, where: Path, resume: str) -> str:
    """``the disk is full writing <what> to <where> (<free> free there); free space, then <resume>``."""
    return (f"the disk is full: writing {what} to {where} failed ({gigabytes(free_bytes(where))} free there); "
            f"free space (or write elsewhere), then {resume}")


@contextlib.contextmanager
def naming_disk_errors(what: str, where: Path, error_type: type[Exception], resume: str) -> Iterator[None]:
    """Re-raise a "no space" error inside the block as ``error_type`` with :func:`disk_full_message`."""
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        raise error_type(disk_full_message(what, where, resume)) from err


def training_footprint(num_params: int, weight_bytes: int, checkpoints: int, final: bool = True) -> int:
    """Bytes a run keeps on disk: ``checkpoints`` x (weights + AdamW state) + the final weights (if ``final``)."""
    return checkpoints * num_params * (weight_bytes + ADAMW_BYTES) + (num_params * weight_bytes if final else 0)


def warn_if_short(out: Path, need: int, detail: str) -> bool:
    """One warning line when the filesystem of ``out`` has less than ``need`` bytes free; returns whether it warned."""
    free = free_bytes(out)
    if free is None or free >= need:
        return False
    log.warning("%s has %s free but this run may write about %s (%s); free space or lower train.save_total_limit, "
                "or a checkpoint save will fail", out, gigabytes(free), gigabytes(need), detail)
    return True
