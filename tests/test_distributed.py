"""Multi-rank training on CPU (gloo): the SLURM path (submitit's local executor) trains ONE run that matches a
single process with the same global batch; launches that would fall back to DataParallel or mismatch GPUs are
refused. torchrun's own CLI path (``torchrun -m asft_repro.train``) and DDP ranks against one process are
tests/test_fsdp2.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from asft_repro.config import ConfigError
from asft_repro.distributed import check_launch
from conftest import ROOT

STEPS = 4
COMMON = ["experiment=demo", "data.size=64", f"train.max_steps={STEPS}", "train.global_batch_size=16",
          "train.per_device_batch_size=8", "train.report_to=[]", "eval.after_train=false", "train.save_strategy=no"]


def only_run(root: Path) -> Path:
    runs = [p for p in root.glob("*/*") if (p / "run.json").exists()]
    assert len(runs) == 1, runs
    return runs[0]


def step_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"ce"' in line]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def one_process(asft_run) -> Path:
    """The reference: one process, 2 micro-batches of 8 accumulated into the global batch of 16 (the shared run:
    the same training identity as COMMON; checkpointing does not change what is trained)."""
    return asft_run


def assert_matches(run: Path, reference: Path) -> None:
    rows, ref_rows = step_rows(run), step_rows(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step once: no rank logs twice
    for row, ref in zip(rows, ref_rows):
        for key in ("loss", "ce", "kl_forward", "dft_weight_ess"):
            assert row[key] == pytest.approx(ref[key], abs=1e-5), (row["step"], key)
    weights, ref_weights = final_weights(run), final_weights(reference)
    assert weights.keys() == ref_weights.keys()
    assert max((weights[k] - ref_weights[k]).abs().max().item() for k in weights) < 1e-5


@pytest.mark.slow
def test_submitit_local_two_tasks_train_one_run(tmp_path, demo_data, one_process):
    done = subprocess.run([sys.executable, "-m", "asft_repro.train", "-m", *COMMON, f"data.data_dir={demo_data}",
                           "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    run = only_run(tmp_path / "outputs")
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert_matches(run, one_process)
    task_logs = sorted((tmp_path / "outputs" / "demo" / ".submitit").glob("*/*_log.out"))
    assert len(task_logs) == 2 and all("completed successfully" in p.read_text() for p in task_logs)


def test_dataparallel_shaped_launch_is_refused():
    with pytest.raises(ConfigError, match="8 GPUs are visible to one training process.*torchrun --nproc_per_node 8"):
        check_launch(world_size=1, local_world_size=1, visible_gpus=8)
    with pytest.raises(ConfigError, match="tasks_per_node = hydra.launcher.gpus_per_node = 8"):
        check_launch(world_size=2, local_world_size=2, visible_gpus=8)
    check_launch(world_size=8, local_world_size=8, visible_gpus=8)
    check_launch(world_size=2, local_world_size=2, visible_gpus=0)  # CPU ranks on gloo
    check_launch(world_size=1, local_world_size=1, visible_gpus=1)


def test_global_batch_must_split_over_the_real_world_size():
    from asft_repro.train import gradient_accumulation
    from conftest import compose_config
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(compose_config("config", ["experiment=demo", "train.global_batch_size=16",
                                                        "train.per_device_batch_size=4"]))
    assert gradient_accumulation(cfg, 2) == 2 and gradient_accumulation(cfg, 4) == 1
    with pytest.raises(ConfigError, match="per_device_batch_size x world_size = 4 x 8"):
        gradient_accumulation(cfg, 8)
    with pytest.raises(ConfigError, match="does not split over 3 ranks"):
        gradient_accumulation(cfg, 3)


def test_zero3_refuses_to_run_on_cpu_and_fsdp2_shards_only_under_a_launcher(monkeypatch):
    from asft_repro.train import strategy_arguments
    from conftest import compose_config
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(compose_config("config", ["experiment=demo", "train.strategy=zero3"]))
    with pytest.raises(ConfigError, match="train.strategy=zero3 needs CUDA GPUs.*use train.strategy=fsdp2 or ddp"):
        strategy_arguments(cfg)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)  # strategy_arguments sets it for fsdp2
    cfg = OmegaConf.to_object(compose_config("config", ["experiment=demo", "train.strategy=fsdp2"]))
    sharded = strategy_arguments(cfg, launcher=True)  # on CPU too (tests/test_fsdp2.py trains it on 2 gloo ranks)
    assert sharded["fsdp"] and sharded["fsdp_config"]["state_dict_type"] == "SHARDED_STATE_DICT"
    assert strategy_arguments(cfg, launcher=False) == {"gradient_checkpointing": False}  # one unlaunched process
    assert "ACCELERATE_USE_FSDP" not in os.environ
