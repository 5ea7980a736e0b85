"""Run directories: one config and one writer per directory, complete checkpoints only, final/ atomic."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from asft_repro.rundir import LOCK_FILE, RunDirError, RunLock, checkpoint_problem
from asft_repro.train import run
from conftest import ASFT_RUN, compose_config

pytestmark = pytest.mark.slow


def cfg_at(out, demo_data, *overrides):
    """The config of the shared ``asft_run`` (conftest.ASFT_RUN) writing to ``out``."""
    return compose_config("config", [*ASFT_RUN, f"data.data_dir={demo_data}", f"output_dir={out}", *overrides])


def steps_logged(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"ce"' in line]


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def max_diff(a, b) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def mark_killed(out) -> None:
    record = json.loads((out / "run.json").read_text())
    record["train_status"] = "running"
    (out / "run.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def uninterrupted(asft_run):
    return asft_run


def test_resume_with_another_config_is_refused(tmp_path, demo_data, uninterrupted):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    saved = (out / "config.yaml").read_text()
    with pytest.raises(RunDirError, match=r"trained under another config \(train.learning_rate: 0.003 -> 0.001\)"):
        run(cfg_at(out, demo_data, "train.learning_rate=1e-3", "train.resume=true"))
    assert (out / "config.yaml").read_text() == saved  # nothing rewritten
    run(cfg_at(out, demo_data, "train.resume=true", "train.per_device_batch_size=16"))  # layout changes are fine


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, demo_data, tiny_model_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "now"}))
        with pytest.raises(RunDirError, match=f"being written by pid {holder.pid}"):
            run(cfg_at(out, demo_data))
        assert not (out / "metrics.jsonl").exists() and not (out / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING):
        run(cfg_at(out, demo_data, "train.max_steps=2"))
    assert "taking over the stale lock" in caplog.text
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_lock_is_exclusive_within_one_host(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunDirError, match="being written by pid"):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


def test_incomplete_checkpoints_are_skipped_and_resume_matches(tmp_path, demo_data, uninterrupted, caplog):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / "final")
    mark_killed(out)
    (out / "checkpoint-4" / "optimizer.pt").unlink()  # killed (or disk full) while writing checkpoint-4
    (out / "checkpoint-6").mkdir()  # killed right after creating the next one
    assert checkpoint_problem(out / "checkpoint-4") == "no optimizer.pt"
    assert checkpoint_problem(out / "checkpoint-6") == "no readable trainer_state.json"
    with caplog.at_level(logging.WARNING):
        run(cfg_at(out, demo_data, "train.resume=true"))
    assert "checkpoint-4 is incomplete (no optimizer.pt)" in caplog.text
    assert steps_logged(out) == [1, 2, 3, 4]  # resumed from checkpoint-2: steps 3-4 re-run once
    assert max_diff(weights(out / "final"), weights(uninterrupted / "final")) < 1e-6  # no fresh optimizer / warm-up
    assert json.loads((out / "run.json").read_text())["train_status"] == "complete"


def test_kill_during_final_save_trains_no_extra_step(tmp_path, demo_data, uninterrupted):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / "final")
    (out / "final.tmp").mkdir()
    (out / "final.tmp" / "config.json").write_text("{}")  # the save was cut short
    mark_killed(out)
    before = (out / "metrics.jsonl").read_text()
    run(cfg_at(out, demo_data, "train.resume=true"))
    assert (out / "metrics.jsonl").read_text() == before  # no step 5
    assert not (out / "final.tmp").exists()
    assert max_diff(weights(out / "final"), weights(uninterrupted / "final")) == 0.0


def test_final_without_weights_is_not_marked_complete(tmp_path):
    from asft_repro.rundir import publish_final

    (tmp_path / "final.tmp").mkdir()
    (tmp_path / "final.tmp" / "config.json").write_text("{}")
    with pytest.raises(RunDirError, match="no model weights after saving"):
        publish_final(tmp_path, tmp_path / "final.tmp")
    assert not (tmp_path / "final").exists()
