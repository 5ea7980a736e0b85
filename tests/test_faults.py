"""Faults a cluster deals out (issue 19): a torn final/, two evaluators on one folder, a full disk, caches that
must be byte-reproducible, and pre-emption by SIGTERM."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import TrainerCallback

import asft_repro.anchor_cache as anchor_cache
import asft_repro.diskspace as diskspace
import asft_repro.train as train_module
import eval.run as eval_run
import eval.runner as runner
from asft_repro.config import ConfigError
from asft_repro.preemption import Preemption, PreemptedError
from asft_repro.rundir import LOCK_FILE, RunDirError, checkpoint_problem
from asft_repro.tables import final_flag
from asft_repro.train import run
from conftest import compose_config
from eval.backends import HFBackend

pytestmark = pytest.mark.slow


def cfg_at(out: Path, demo_data: Path, *overrides: str):
    return compose_config("config", [
        "experiment=demo", f"data.data_dir={demo_data}", f"output_dir={out}", "train.report_to=[]", "data.size=64",
        "method=sft", "train.log_kl=false", "eval.after_train=false", "train.save_strategy=steps",
        "train.save_steps=2", "train.max_steps=2", "train.save_total_limit=null", *overrides])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Copies (load_file's tensors may map the file, which the tests then truncate)."""
    return {k: v.clone() for k, v in load_file(str(folder / "model.safetensors")).items()}


def record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def score(demo_data: Path, model: str, *overrides: str) -> dict:
    """``python -m eval.run`` in-process: math500, 2 items, short answers."""
    overrides = (f"eval.benchmarks_dir={demo_data}/benchmarks", "eval.limit=2", "eval.max_new_tokens=4",
                 "benchmarks=[math500]", f"model_path={model}", *overrides)
    return eval_run.run(compose_config("eval_run", list(overrides)), list(overrides))


# ---- 1. a torn final/ is never reused ---------------------------------------------------------------------

def test_torn_final_is_refused_everywhere_and_redo_final_resaves_it(tmp_path, demo_data, tiny_model_path):
    out = tmp_path / "run"
    run(cfg_at(out, demo_data))
    final = out / "final"
    good = weights(final)
    recorded = record(out)["final_files"]["model.safetensors"]
    assert recorded["bytes"] == (final / "model.safetensors").stat().st_size and len(recorded["sha256"]) == 64
    with (final / "model.safetensors").open("r+b") as f:
        f.truncate(recorded["bytes"] // 2)
    torn = f"{final / 'model.safetensors'} is {recorded['bytes'] // 2} bytes"
    with pytest.raises(RunDirError, match=f"{torn}.*train.resume=true train.redo_final=true"):
        run(cfg_at(out, demo_data, "train.resume=true"))  # not "already complete, reusing"
    assert final_flag(out, record(out)) == "final/ damaged"  # the tables label the run (sizes only)
    run_dir = [f"run_dir={out}"]
    with pytest.raises(ConfigError, match=f"{torn}.*train.redo_final=true"):
        eval_run.run(compose_config("eval_run", run_dir), run_dir)
    with pytest.raises(ConfigError, match=r"model.safetensors is \d+ bytes, its header describes \d+ \(torn\)"):
        score(demo_data, str(final))  # a folder without a record: its header is checked
    with pytest.raises(ConfigError, match=r"model.safetensors is \d+ bytes, its header describes"):
        HFBackend(str(final))  # the load itself names the file (no safetensors traceback)
    assert not (out / "eval").exists()
    run(cfg_at(out, demo_data, "train.resume=true", "train.redo_final=true"))  # re-saved from checkpoint-2
    assert all(torch.equal(good[k], v) for k, v in weights(final).items())
    assert record(out)["final_files"]["model.safetensors"] == recorded
    # same size, other bytes: only the sha256 tells, and it is checked before reuse
    with (final / "model.safetensors").open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(RunDirError, match="does not match the sha256 recorded"):
        run(cfg_at(out, demo_data, "train.resume=true"))


# ---- 2. one evaluator per output folder -------------------------------------------------------------------

def test_a_second_evaluator_is_refused_and_repeated_records_are_dropped(tmp_path, demo_data, tiny_model_path):
    root = tmp_path / "scores"
    metrics = score(demo_data, tiny_model_path, f"out_dir={root}")
    folder = root / metrics["settings_hash"]
    records = folder / "math500.jsonl"
    assert not (folder / LOCK_FILE).exists()  # released
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "now"}))
        with pytest.raises(ConfigError, match=f"another evaluation is already scoring .*pid {holder.pid}"):
            score(demo_data, tiny_model_path, f"out_dir={root}")
    finally:
        holder.kill()
        holder.wait()
    # records two evaluators appended before the lock existed: each item once after the next read
    lines = records.read_text().splitlines()
    records.write_text("\n".join(lines + lines[:1]) + "\n")
    again = score(demo_data, tiny_model_path, f"out_dir={root}")  # the dead holder's lock is taken over
    ids = Counter(json.loads(line)["id"] for line in records.read_text().splitlines())
    assert len(ids) == 2 and set(ids.values()) == {1}
    assert again["benchmarks"]["math500"]["num_items"] == 2


# ---- 3. a full disk is named --------------------------------------------------------------------------------

def test_full_disk_during_a_checkpoint_is_one_line_and_warned_before(tmp_path, demo_data, tiny_model_path,
                                                                     monkeypatch, caplog):
    out = tmp_path / "run"
    real_save, optimizer_saves = torch.save, []

    def save(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt"):
            optimizer_saves.append(path)
            if len(optimizer_saves) == 2:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4304")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda _p: usage._replace(free=1_000_000))
    with caplog.at_level(logging.WARNING), pytest.raises(RunDirError) as failed:
        run(cfg_at(out, demo_data, "train.max_steps=4"))
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"the disk is full: writing checkpoint-4 to {out} failed "
                                                      f"(1.0 MB free there)")
    assert "train.resume=true" in message
    assert record(out)["train_status"] == "running"
    assert not (out / "checkpoint-4").exists() and checkpoint_problem(out / "checkpoint-2") is None
    assert any("has 1.0 MB free but this run may write about 1.8 MB" in m for m in caplog.messages)  # warned up front


def test_full_disk_writing_eval_records_and_anchor_shards_is_one_line(tmp_path, demo_data, tiny_model_path,
                                                                      monkeypatch):
    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner, "append_jsonl", no_space)
    with pytest.raises(ConfigError, match=r"the disk is full: writing eval records to .*math500.jsonl failed "
                                          r"\(.* GB free there\); free space .*rerun the same command"):
        score(demo_data, tiny_model_path, f"out_dir={tmp_path / 'scores'}")
    monkeypatch.setattr(anchor_cache, "save_safetensors", no_space)
    rows = anchor_cache.topk_rows(torch.randn(3, 40), 4)
    with pytest.raises(anchor_cache.AnchorCacheError, match="the disk is full: writing anchor shard shard-00000"):
        anchor_cache.write_shard(tmp_path / "shard-00000.safetensors", [7], [3], rows)
    assert not list(tmp_path.glob("shard-*"))  # no half-written temp file left
    quota = RuntimeError("save failed")
    quota.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert diskspace.is_disk_full(quota) and not diskspace.is_disk_full(OSError(errno.EACCES, "Permission denied"))


# ---- 4. byte-reproducible caches ----------------------------------------------------------------------------

def test_anchor_shards_and_builds_are_byte_identical(tmp_path, demo_data, tiny_model_path):
    from asft_repro.anchor import build_anchor_cache

    rows = anchor_cache.topk_rows(torch.randn(9, 40), 4)
    shards = [anchor_cache.write_shard(tmp_path / f"s{i}.safetensors", [1, 2], [4, 5], rows) for i in range(8)]
    assert len({entry["sha256"] for entry in shards}) == 1  # safetensors' own writer orders the metadata at random
    shutil.copytree(demo_data / "numina_cot" / "64", tmp_path / "numina_cot" / "64")
    cfg = OmegaConf.to_object(compose_config("config", ["experiment=demo", f"data.data_dir={tmp_path}", "data.size=64",
                                                        "method.anchor_k=16", "anchor.records_per_shard=32"]))
    folder = build_anchor_cache(cfg)
    first = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    shutil.rmtree(folder)
    assert build_anchor_cache(cfg) == folder
    second = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    assert list(first) == list(second) == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    assert first == second


# ---- 5. pre-emption ---------------------------------------------------------------------------------------

class SignalAtStep(TrainerCallback):
    """Sends this process ``signum`` when optimizer step ``step`` begins."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            signal.raise_signal(self.signum)


def test_sigterm_saves_a_checkpoint_and_resume_is_identical(tmp_path, demo_data, tiny_model_path, monkeypatch):
    overrides = ("train.max_steps=6", "train.save_strategy=no")
    reference = run(cfg_at(tmp_path / "reference", demo_data, *overrides))
    out = tmp_path / "run"
    callbacks = train_module.training_callbacks
    monkeypatch.setattr(train_module, "training_callbacks", lambda *a: [*callbacks(*a), SignalAtStep(3)])
    def quiet(*_args) -> None:  # without the project's handler, the signal must not kill the test process
        pass

    previous = signal.signal(signal.SIGTERM, quiet)
    try:
        with pytest.raises(PreemptedError, match=r"pre-empted \(SIGTERM\) at step 3: checkpoint-3 .* is complete; "
                                                 r"rerun with train.resume=true"):
            run(cfg_at(out, demo_data, *overrides))
        assert signal.getsignal(signal.SIGTERM) is quiet  # the handler is training's only
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert record(out)["train_status"] == "preempted" and record(out)["preempted_at_step"] == 3
    assert checkpoint_problem(out / "checkpoint-3") is None and not (out / "final").exists()
    monkeypatch.setattr(train_module, "training_callbacks", callbacks)
    run(cfg_at(out, demo_data, *overrides, "train.resume=true"))
    assert record(out)["train_status"] == "complete"
    a, b = weights(reference / "final"), weights(out / "final")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_second_signal_is_left_to_its_default_action():
    before = signal.getsignal(signal.SIGUSR1)
    preemption = Preemption()
    with preemption.installed():
        assert signal.getsignal(signal.SIGUSR1) == preemption._handle
        preemption._handle(signal.SIGUSR1, None)  # the first signal: flagged, the defaults back
        assert preemption.signum == signal.SIGUSR1
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL == signal.getsignal(signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) == before



def test_ranks_agree_to_stop_at_the_same_step(monkeypatch):
    """Rank 0 got no signal, another rank did: the max all-reduce makes rank 0 save and stop at the same step."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    reduced = []

    def all_reduce(tensor, op):  # what gloo returns when the other rank holds 1
        reduced.append(op)
        tensor.fill_(1)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    preemption = Preemption()
    control = preemption.on_step_end(SimpleNamespace(world_size=2, device=torch.device("cpu")),
                                     SimpleNamespace(global_step=5, is_world_process_zero=True), TrainerControl())
    assert reduced == [torch.distributed.ReduceOp.MAX] and preemption.signum is None
    assert control.should_save and control.should_training_stop and preemption.step == 5
