"""Nested, seeded training subsets and benchmark files, each with a manifest.

Writing is all-or-nothing and idempotent: identical inputs give byte-identical files; an
existing output whose manifest matches is reused; one that differs is an error, never
overwritten. With a ``Staging``, new folders are written under a temp folder and moved into
place only once the whole prep has succeeded, so a failed prep leaves nothing behind.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from asft_repro.files import sha256_file
from data_prep.sources import PrepError

FORMAT_VERSION = 1


def parse_size(size: str | int) -> int:
    """'10k' -> 10000, '1m' -> 1000000, '256' -> 256."""
    match = re.fullmatch(r"(\d+)([kKmM]?)", str(size).strip())
    if not match:
        raise PrepError(f"bad size '{size}'; use a count like 256, 10k or 1m")
    return int(match.group(1)) * {"": 1, "k": 1000, "m": 1_000_000}[match.group(2).lower()]


def format_all(rows: Iterable[dict], formatter: Callable[[dict, int], dict | str]) -> tuple[list[dict], Counter]:
    """Apply ``formatter(row, index)``; strings it returns are drop reasons, counted."""
    kept, dropped = [], Counter()
    for index, row in enumerate(rows):
        out = formatter(row, index)
        if isinstance(out, str):
            dropped[out] += 1
        else:
            kept.append(out)
    return kept, dropped


def nested_order(n: int, seed: int, sampling: str) -> list[int]:
    """Index order whose prefixes are the subsets (so smaller subsets nest in larger ones)."""
    order = list(range(n))
    if sampling == "random":
        random.Random(seed).shuffle(order)
    elif sampling != "head":
        raise PrepError(f"unknown sampling '{sampling}'; use random or head")
    return order


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(path)


class Staging:
    """Output folders written under one temp folder in ``root``, moved into place by ``commit``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp: Path | None = None
        self.created: list[Path] = []  # root and the ancestors this prep made (removed again by discard)
        self.moves: list[tuple[Path, Path]] = []
        self.notes: list[str] = []  # report lines, printed once the folders are in place

    def folder(self, final: Path) -> Path:
        """A fresh folder standing in for ``final`` until commit."""
        if self.tmp is None:
            self.created = [p for p in [self.root, *self.root.parents] if not p.exists()]
            self.root.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=".prep-staging-", dir=self.root))
        staged = self.tmp / str(len(self.moves))
        self.moves.append((staged, final))
        return staged

    def commit(self) -> None:
        """Move every staged folder to its final place."""
        for staged, final in self.moves:
            final.parent.mkdir(parents=True, exist_ok=True)
            staged.rename(final)
        self._remove_tmp()

    def discard(self) -> None:
        """Remove the staged folders, and the output folders this prep created, as if it never ran."""
        self._remove_tmp()
        for path in self.created:  # deepest first
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()

    def _remove_tmp(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


@contextmanager
def staged(root: Path) -> Iterator[Staging]:
    """A Staging that commits when the block succeeds and is discarded when it raises."""
    staging = Staging(root)
    try:
        yield staging
    except BaseException:
        staging.discard()
        raise
    staging.commit()


def publish(out_dir: Path, filename: str, rows: list[dict], manifest: dict[str, Any], staging: Staging | None = None) -> str:
    """Write ``rows`` and ``manifest.json`` into ``out_dir`` unless a matching copy exists.

    Returns "written" or "reused"; raises PrepError when a different copy is already there.
    With ``staging`` the folder is written to a temp place and appears at commit.
    """
    data_path, manifest_path = out_dir / filename, out_dir / "manifest.json"
    if manifest_path.exists() or data_path.exists():
        old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        old_core = {k: v for k, v in old.items() if k != "sha256"}
        if old_core != manifest:
            diff = sorted(k for k in set(old_core) | set(manifest) if old_core.get(k) != manifest.get(k))
            raise PrepError(f"{out_dir} already holds a different subset (differs in: {', '.join(diff)}); "
                            f"delete it or pass another out_dir")
        if not data_path.exists() or sha256_file(data_path) != old.get("sha256"):
            raise PrepError(f"{data_path} does not match its manifest's sha256 (edited or truncated); delete {out_dir} and rerun")
        return "reused"
    if staging is not None:
        target = staging.folder(out_dir)
        data_path, manifest_path = target / filename, target / "manifest.json"
    write_jsonl(data_path, rows)
    manifest_path.write_text(json.dumps({**manifest, "sha256": sha256_file(data_path)}, indent=2, sort_keys=True) + "\n")
    return "written"
