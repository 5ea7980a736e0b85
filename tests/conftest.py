"""Shared fixtures: composed configs, a fixture-data prep, the tiny model, evaluation in-process."""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


ENTRY = {"data_prep": "data_prep.__main__"}  # module users type -> module holding main()


def exit_status(code: object) -> tuple[int, str]:
    """(exit code, what the interpreter prints) for ``SystemExit(code)``."""
    if code is None:
        return 0, ""
    if isinstance(code, int):
        return code, ""
    return 1, f"{code}\n"


def run_in_process(module: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """``python -m module *argv`` in this process (``main()`` with ``sys.argv`` patched): (exit code, stderr including
    the SystemExit message as the interpreter would print it, stdout)."""
    from hydra.core.global_hydra import GlobalHydra

    main = importlib.import_module(ENTRY.get(module, module)).main
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", [module, *argv])
    capsys.readouterr()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # Hydra points logging at this test's captured stdout: restored below
    code, tail = 0, ""
    try:
        main()
    except SystemExit as exit_:
        code, tail = exit_status(exit_.code)
    except Exception:  # what the interpreter would print as a traceback
        code, tail = 1, traceback.format_exc()
    finally:
        GlobalHydra.instance().clear()
        root.handlers[:], root.level = handlers, level
    captured = capsys.readouterr()
    return code, captured.err + tail, captured.out


if os.environ.get("PYTEST_XDIST_WORKER"):  # make test: two workers on two cores, one thread each
    import torch

    torch.set_num_threads(1)


# The longest modules (their fixtures launch processes or train several runs), longest first: `make test` runs with
# --no-loadscope-reorder, so xdist hands modules out in this order and no worker is left running a long one alone at
# the end. Their seconds under `make test`: about 75, 60, 50, 50, 30, 27, 24.
LONGEST_FIRST = ["test_fsdp2.py", "test_pipeline.py", "test_graders.py", "test_bad_input.py", "test_distributed.py",
                 "test_anchor.py", "test_eval_parallel.py"]


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other modules keep their order


def pytest_collection_finish(session) -> None:
    """Every test module (torch, transformers, sympy, ...) is imported now: freeze those ~500k objects out of the
    cyclic garbage collector, whose every full pass (the Trainer runs one per ``train()``, Python its own ones)
    would otherwise walk them again, ~0.35 s each on this machine."""
    gc.collect()
    gc.freeze()


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


# ASFT on the 64-record math fixture, 4 steps of 2 micro-batches of 8: the reference run of several modules
ASFT_RUN = ["experiment=demo", "data.size=64", "method=asft", "train.max_steps=4", "train.global_batch_size=16",
            "train.per_device_batch_size=8", "train.report_to=[]", "eval.after_train=false", "train.save_strategy=steps",
            "train.save_steps=2", "train.save_total_limit=null"]


@pytest.fixture(scope="session")
def asft_run(tmp_path_factory, demo_data, tiny_model_path) -> Path:
    """:data:`ASFT_RUN` trained once (checkpoints at steps 2 and 4, final/): resume, 1 vs 2 ranks and the fused
    head vs the logits path all compare against it. Tests copy it before changing anything."""
    from asft_repro.train import run

    out = tmp_path_factory.mktemp("asft_run") / "run"
    return run(compose_config("config", [*ASFT_RUN, f"data.data_dir={demo_data}", f"output_dir={out}"]))


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from asft_repro.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model())


@pytest.fixture(autouse=True)
def eval_in_process(request, monkeypatch):
    """Training's ``eval.after_train`` scores the final model in this process instead of a fresh
    ``python -m eval.run run_dir=...`` (the same ``evaluate`` call on the same config): a fresh Python per run
    costs seconds. Tests marked ``subprocess_eval``, and every CLI test (a real subprocess), keep the child."""
    if request.node.get_closest_marker("subprocess_eval"):
        return
    import asft_repro.train

    monkeypatch.setattr(asft_repro.train, "evaluate_in_subprocess", evaluate_here)


def evaluate_here(cfg, out: Path) -> None:
    """What training's child ``python -m eval.run run_dir=OUT`` does, in this process."""
    from eval.runner import evaluate

    record = json.loads((out / "run.json").read_text())
    evaluate(cfg, record["model_path"], out / "eval", cfg.eval.benchmarks)
