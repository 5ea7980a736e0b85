"""Where the project's files are: the Hydra config folder and the layout of prepared data."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(REPO_ROOT / "conf")
SOURCES_FILE = REPO_ROOT / "conf" / "prep" / "sources.yaml"
TRAIN_FILE = "train.jsonl"
BENCHMARK_FILE = "test.jsonl"


def subset_dir(data_dir: str | Path, name: str, size: str | int) -> Path:
    """``<data_dir>/<name>/<size>/``: one prepared training subset (train.jsonl + manifest.json)."""
    return Path(data_dir) / name / str(size)


def benchmark_file(benchmarks_dir: str | Path, name: str) -> Path:
    """``<benchmarks_dir>/<name>/test.jsonl``: one prepared benchmark."""
    return Path(benchmarks_dir) / name / BENCHMARK_FILE
