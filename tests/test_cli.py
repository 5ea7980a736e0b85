"""CLI errors and the error policy of every entry point (the end-to-end CLI sweep is tests/test_pipeline.py's)."""

import json

import pytest

from conftest import ROOT, run_in_process

pytestmark = pytest.mark.slow


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def last_line(module: str, *argv: str) -> str:
        code, err, _ = run_in_process(module, list(argv), monkeypatch, capsys)
        assert code != 0
        return err.strip().splitlines()[-1]

    assert last_line("asft_repro.train", "data.data_dir=/nonexistent", "eval.after_train=false").startswith(
        "asft_repro.train: training data /nonexistent/")
    assert last_line("asft_repro.train", "method.kl_coef=-1") == "asft_repro.train: method.kl_coef=-1.0 is invalid; set it to 0 or more"
    assert "unknown benchmark 'gsm8k'" in last_line("eval.run", "benchmarks=[gsm8k]")
    assert last_line("asft_repro.tables").startswith("asft_repro.tables: ")
    assert ROOT.exists()


def test_a_failing_sweep_job_is_reported_and_the_others_still_run(tmp_path, demo_data, tiny_model_path, monkeypatch, capsys):
    """One error policy: a job's project error stays inside Hydra's job handling (the next job runs), the sweep
    exits 1 with one line naming the failed job, and a float32 model gets no float16 advice."""
    monkeypatch.chdir(tmp_path)
    code, err, _ = run_in_process("asft_repro.train", [
        "-m", "experiment=demo", "method=sft", f"data.data_dir={demo_data}", "data.size=64", "train.max_steps=3",
        "train.report_to=[]", "train.save_strategy=no", "eval.after_train=false", "train.max_grad_norm=1e30",
        "train.learning_rate=1e30,2e-3"], monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in err, err[-2000:]
    assert last.startswith("asft_repro.train: 1 job(s) of the sweep failed (the others ran): job 0 (")
    assert "non-finite loss" in last and "float16" not in last
    runs = {p.name: json.loads((p / "run.json").read_text()) for p in (tmp_path / "outputs" / "demo").iterdir()
            if (p / "run.json").exists()}
    assert sorted(r["train_status"] for r in runs.values()) == ["complete", "running"]  # job 1 trained after job 0 failed


def test_project_errors_end_as_one_line_and_bugs_keep_their_traceback():
    from asft_repro.anchor_cache import AnchorCacheError
    from asft_repro.hydra_cli import JobFailed, hydra_task
    from asft_repro.rundir import RunDirError
    from asft_repro.trainer import NonFiniteLossError

    for error in (AnchorCacheError("cache broken; rebuild it"), RunDirError("busy; wait"), NonFiniteLossError("nan; lower")):
        @hydra_task("prog")
        def task(cfg, error=error):
            raise error

        with pytest.raises(JobFailed) as failed:
            task(None)
        assert str(failed.value) == f"prog: {error}"

    @hydra_task("prog")
    def buggy(cfg):
        return {}["missing"]

    with pytest.raises(KeyError):  # not a project error: Hydra prints its traceback
        buggy(None)


def test_anchor_cli_is_a_hydra_app(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err, shown = run_in_process("asft_repro.anchor", ["experiment=demo", "anchor.k=32", "--cfg", "job"], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    assert "anchor:\n  k: 32\n" in shown and "batch_size: 8" in shown
    code, err, _ = run_in_process("asft_repro.anchor", ["anchor.kk=3"], monkeypatch, capsys)
    assert code == 1 and err.strip().splitlines()[-1].startswith("asft_repro.anchor: unknown key 'anchor.kk'")
