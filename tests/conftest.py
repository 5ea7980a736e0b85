"""Shared fixtures: composed configs, a fixture-data prep, the tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def compose_config(name: str, overrides: list[str] | None = None):
    from asft_repro.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [], return_hydra_config=False)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """Fixture subsets (sizes 64, 256) and all benchmarks, prepared by the real prep code."""
    from data_prep.__main__ import expand_benchmarks, prepare_benchmark, prepare_training

    out = tmp_path_factory.mktemp("data")
    cfg = compose_config("prep", [f"out_dir={out}", f"local_dir={ROOT / 'data_prep' / 'fixtures'}", "sizes=[64,256]"])
    for name in cfg.training:
        prepare_training(name, cfg)
    for name in expand_benchmarks(list(cfg.benchmarks), cfg):
        prepare_benchmark(name, cfg)
    return out


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from asft_repro.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model())
