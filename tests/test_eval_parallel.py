"""Data-parallel evaluation (``eval.data_parallel_size``): worker processes, part files, merge, resume, errors.

CPU workers (hf backend, tiny model) stand in for GPU ones: on a machine without GPUs CUDA_VISIBLE_DEVICES
is left alone, and the GPU split is checked on ``data_parallel_plan`` with a given GPU list.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

import eval.run as eval_run  # registers the eval_cli_schema the eval_run config extends
from asft_repro.config import ConfigError
from conftest import compose_config
from eval.backends import HFBackend, Sampling
from eval.runner import WorkerError, data_parallel_plan, eval_settings, gpu_ids, settings_hash

BENCHES = ("math500", "medqa")  # a generated (math) and a log-likelihood (multiple choice) benchmark


def score(demo_data: Path, out: Path, *overrides: str, benchmarks_dir: Path | None = None) -> dict:
    """``python -m eval.run`` in-process on the tiny model: 4 items each, short answers, one item per batch."""
    overrides = (f"eval.benchmarks_dir={benchmarks_dir or demo_data / 'benchmarks'}", "eval.limit=4",
                 "eval.max_new_tokens=5", "eval.batch_size=1", f"benchmarks=[{','.join(BENCHES)}]",
                 f"out_dir={out}", *overrides)
    return eval_run.run(compose_config("eval_run", list(overrides)), list(overrides))


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def folder(out: Path, metrics: dict) -> Path:
    return out / metrics["settings_hash"]


# --- config and plan (fast) -------------------------------------------------------------------------------

def test_bad_data_parallel_size_fails_with_one_line():
    for config in ("config", "eval_run"):
        with pytest.raises(ConfigError) as err:
            OmegaConf.to_object(compose_config(config, ["eval.data_parallel_size=-1"]))
        assert str(err.value) == "eval.data_parallel_size=-1 is invalid; set 0 (auto) or more"
    assert OmegaConf.to_object(compose_config("config", ["eval.data_parallel_size=0"])).eval.data_parallel_size == 0


def test_plan_splits_the_visible_gpus():
    vllm = SimpleNamespace(backend="vllm", tensor_parallel_size=2, data_parallel_size=0)
    assert data_parallel_plan(vllm, ["4", "5", "6", "7", "8", "9", "10", "11"]) == ["4,5", "6,7", "8,9", "10,11"]
    assert data_parallel_plan(SimpleNamespace(**{**vars(vllm), "data_parallel_size": 2}), list("0123")) == ["0,1", "2,3"]
    assert data_parallel_plan(SimpleNamespace(**{**vars(vllm), "tensor_parallel_size": 3}), list("01234567")) == ["0,1,2", "3,4,5"]
    assert data_parallel_plan(SimpleNamespace(**{**vars(vllm), "tensor_parallel_size": 4}), list("01")) == [None]
    hf = SimpleNamespace(backend="hf", tensor_parallel_size=1, data_parallel_size=0)
    assert data_parallel_plan(hf, list("012")) == ["0", "1", "2"]
    assert data_parallel_plan(hf, []) == [None]  # CPU: auto is one process
    assert data_parallel_plan(SimpleNamespace(**{**vars(hf), "data_parallel_size": 3}), []) == [None] * 3  # CPU workers
    assert data_parallel_plan(SimpleNamespace(**{**vars(hf), "data_parallel_size": 1})) == [None]  # GPUs not even asked
    assert data_parallel_plan(SimpleNamespace(backend="openai", tensor_parallel_size=1, data_parallel_size=0), ["0"]) == [None]
    with pytest.raises(ConfigError) as err:
        data_parallel_plan(SimpleNamespace(**{**vars(vllm), "data_parallel_size": 3}), list("0123"))
    assert str(err.value).startswith("eval.data_parallel_size=3 needs 6 GPUs (2 per worker) but 4 are visible; ")
    assert gpu_ids("GPU-a, GPU-b,GPU-c", 2) == ["GPU-a", "GPU-b"] and gpu_ids(None, 2) == ["0", "1"]
    assert gpu_ids("", 0) == []


def test_settings_hash_ignores_data_parallel_size(tiny_model_path):
    cfgs = [OmegaConf.to_object(compose_config("eval_run", [f"eval.data_parallel_size={n}"])) for n in (1, 2, 0)]
    hashes = {settings_hash(eval_settings(cfg, tiny_model_path, "alpaca", {})) for cfg in cfgs}
    assert len(hashes) == 1


def test_hf_sampling_seeds_are_per_item(tiny_model_path):
    hf = HFBackend(tiny_model_path, batch_size=4)
    prompts = ["What is 2 plus 3?", "Compute 4 times 5.", "What is 7 minus 1?"]
    sampling = Sampling(max_new_tokens=6, temperature=1.0, n=2)
    together = hf.generate(prompts, sampling, seeds=[10, 11, 12])
    apart = hf.generate(prompts[1:2], sampling, seeds=[11]) + hf.generate([prompts[2], prompts[0]], sampling, seeds=[12, 10])
    assert together == [apart[2], apart[0], apart[1]]  # an item's samples do not depend on its batch


# --- worker processes (slow) ------------------------------------------------------------------------------

@pytest.fixture()
def workers_in_process(monkeypatch):
    """The parent's split, part files, merge and resume with each worker's job run in this process, one after the
    other (``run_worker_job``, what a worker process runs): the worker processes themselves are tested by
    test_worker_processes_write_one_process_records_and_a_failure_is_one_line (one launch)."""
    import eval.runner as runner

    def run_here(plan, job, jobs, out_dir):
        for worker, benchmarks in enumerate(jobs):
            if benchmarks:
                runner.run_worker_job({**job, "worker": worker, "workers": len(plan), "benchmarks": benchmarks})

    monkeypatch.setattr(runner, "run_workers", run_here)


@pytest.mark.slow
def test_two_workers_match_one_process(tmp_path, demo_data, tiny_model_path, workers_in_process):
    one = score(demo_data, tmp_path / "one")
    two = score(demo_data, tmp_path / "two", "eval.data_parallel_size=2")
    assert two["settings_hash"] == one["settings_hash"]
    assert two == one and two["benchmarks"]["math500"]["num_items"] == 4
    for name in BENCHES:
        assert records(folder(tmp_path / "two", two) / f"{name}.jsonl") == records(folder(tmp_path / "one", one) / f"{name}.jsonl")
    assert sorted(p.name for p in folder(tmp_path / "two", two).iterdir()) == \
        sorted(p.name for p in folder(tmp_path / "one", one).iterdir())  # no part files left
    assert json.loads((folder(tmp_path / "two", two) / "metrics.json").read_text()) == \
        json.loads((folder(tmp_path / "one", one) / "metrics.json").read_text())


@pytest.mark.slow
def test_two_workers_match_one_process_when_sampling(tmp_path, demo_data, tiny_model_path, workers_in_process):
    sampled = ("eval.temperature=1.0", "eval.n_samples=2", "eval.batch_size=3", "benchmarks=[math500]")
    one = score(demo_data, tmp_path / "one", *sampled)
    two = score(demo_data, tmp_path / "two", *sampled, "eval.data_parallel_size=2")
    assert two == one
    assert records(folder(tmp_path / "two", two) / "math500.jsonl") == records(folder(tmp_path / "one", one) / "math500.jsonl")


@pytest.mark.slow
def test_a_killed_workers_part_is_resumed(tmp_path, demo_data, tiny_model_path, workers_in_process):
    out = tmp_path / "ev"
    full = score(demo_data, out, "eval.data_parallel_size=2")
    hashed = folder(out, full)
    reference = {name: records(hashed / f"{name}.jsonl") for name in BENCHES}
    (hashed / "math500.jsonl").unlink()
    (hashed / "medqa.jsonl").unlink()
    (hashed / "metrics.json").unlink()
    # worker 1 was killed after its first math500 item (index 1), mid-way through writing the second (index 3)
    kept = {**reference["math500"][1], "outputs": ["KEPT FROM THE KILLED RUN"]}
    (hashed / "math500.part1of2.jsonl").write_text(json.dumps(kept) + "\n" + json.dumps(reference["math500"][3])[:20])
    resumed = score(demo_data, out, "eval.data_parallel_size=2")
    assert resumed == full
    assert records(hashed / "math500.jsonl") == [reference["math500"][0], kept, *reference["math500"][2:]]
    assert records(hashed / "medqa.jsonl") == reference["medqa"]
    assert not list(hashed.glob("*.part*"))
    # parts of a run with another worker count are merged too, by the one-process path as well
    (hashed / "math500.jsonl").write_text(json.dumps(reference["math500"][0]) + "\n")
    (hashed / "math500.part2of3.jsonl").write_text(json.dumps(kept) + "\n")
    assert score(demo_data, out) == full
    assert records(hashed / "math500.jsonl") == [reference["math500"][0], kept, *reference["math500"][2:]]
    assert not list(hashed.glob("*.part*"))


@pytest.mark.slow
def test_worker_processes_write_one_process_records_and_a_failure_is_one_line(tmp_path, demo_data, tiny_model_path):
    """The one launch of real worker processes: worker 1 fails on its second math500 item (its first is kept), worker 0
    finishes both benchmarks; each part holds exactly the records one process writes for those items."""
    one = score(demo_data, tmp_path / "one")
    reference = {name: records(folder(tmp_path / "one", one) / f"{name}.jsonl") for name in BENCHES}
    bench = tmp_path / "benchmarks"
    shutil.copytree(demo_data / "benchmarks" / "math500", bench / "math500")
    shutil.copytree(demo_data / "benchmarks" / "medqa", bench / "medqa")
    rows = records(bench / "math500" / "test.jsonl")
    del rows[3]["answer"]  # item 3 (worker 1's second) breaks grading
    (bench / "math500" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ev"
    with pytest.raises(WorkerError) as err:
        score(demo_data, out, "eval.data_parallel_size=2", benchmarks_dir=bench)
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, OSError)  # eval.run prints it as its one error line
    assert message.startswith("eval worker 1 of 2 failed (exit code 1): KeyError: 'answer'; ")
    assert "rerun the same command to resume" in message
    (hashed,) = out.iterdir()
    assert [r["id"] for r in records(hashed / "math500.part1of2.jsonl")] == [rows[1]["id"]]
    assert len(records(hashed / "math500.part0of2.jsonl")) == 2
    assert not (hashed / "math500.jsonl").exists() and not (hashed / "metrics.json").exists()
    # worker w scores items w, w + 2, ...: its records equal one process's for those items
    assert records(hashed / "math500.part0of2.jsonl") == reference["math500"][0::2]
    assert records(hashed / "math500.part1of2.jsonl") == reference["math500"][1:2]
    assert records(hashed / "medqa.part0of2.jsonl") == reference["medqa"][0::2]
