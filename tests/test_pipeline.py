"""End to end on the tiny model: the one CLI sweep (train -> metrics.jsonl -> eval in a child -> plan, tables,
plots), plus run-dir safety."""

import json
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from asft_repro.rundir import RunDirError
from asft_repro.train import run
from conftest import compose_config, evaluate_here, run_in_process

pytestmark = pytest.mark.slow
METHODS = ("sft", "dft", "asft")


def train_cfg(tmp_path, demo_data, *overrides):
    return compose_config("config", [
        "experiment=demo", f"data.data_dir={demo_data}", f"eval.benchmarks_dir={demo_data}/benchmarks",
        f"output_dir={tmp_path}/${{run_name}}", "train.report_to=[]", "train.num_epochs=2", "data.size=64",
        "eval.limit=6", "eval.max_new_tokens=24", *overrides])


def sweep_overrides(demo_data):
    """The sweep's settings, as users type them: Base, SFT, DFT and ASFT on the math fixtures, 16 steps each."""
    return ["experiment=demo", f"data.data_dir={demo_data}", f"eval.benchmarks_dir={demo_data}/benchmarks",
            "data.size=64", "train.num_epochs=4", "train.report_to=[wandb]", "eval.limit=4", "eval.max_new_tokens=16"]


def metrics_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"ce"' in line]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, demo_data, tiny_model_path):
    """The one end-to-end CLI sweep: a Hydra multirun of ASFT in a fresh process, evaluated by a child
    ``python -m eval.run`` (the train -> eval subprocess path), wandb offline; Base, SFT and DFT of the same grid
    trained here, in this process (each child costs seconds of imports; in-process multirun sweeps of several cells
    are tests/test_cli.py's). Returns (cwd, the console, the run directories by method)."""
    cwd = tmp_path_factory.mktemp("sweep")
    done = subprocess.run([sys.executable, "-m", "asft_repro.train", "-m", "method=asft",
                           *sweep_overrides(demo_data)], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    root = cwd / "outputs" / "demo"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("asft_repro.train.evaluate_in_subprocess", evaluate_here)
        for method in ("base", "sft", "dft"):  # report_to is not part of a run's identity or name
            run(compose_config("config", [*sweep_overrides(demo_data), f"method={method}", "train.report_to=[]",
                                          f"output_dir={root}/${{run_name}}"]))
    dirs = {json.loads((p / "run.json").read_text())["method"]: p for p in root.iterdir() if (p / "run.json").exists()}
    return cwd, done, dirs


@pytest.fixture(scope="module")
def trained(sweep):
    """SFT, DFT and ASFT runs (16 steps each) on the math fixtures, evaluated: the sweep's root and run dirs."""
    cwd, _done, dirs = sweep
    return cwd / "outputs" / "demo", {m: dirs[m] for m in METHODS}


def test_multirun_sweep_names_runs_then_plan_tables_and_plots(sweep, demo_data, monkeypatch, capsys):
    cwd, _done, dirs = sweep
    runs = sorted(p.name for p in (cwd / "outputs" / "demo").iterdir() if p.is_dir())
    # the launch's overrides are spelt out, the hash names the whole config; SFT and DFT, trained in this process,
    # have no command-line overrides to spell
    patterns = [r"tiny-numina_cot-64-asft-kl0\.05-s42-num_epochs_4\.0-[0-9a-f]{8}", r"tiny-numina_cot-64-dft-s42-[0-9a-f]{8}",
                r"tiny-numina_cot-64-sft-s42-[0-9a-f]{8}", r"tiny-math-base-[0-9a-f]{8}"]
    assert len(runs) == 4 and all(any(re.fullmatch(p, r) for r in runs) for p in patterns), runs
    assert list((dirs["asft"] / "wandb").glob("offline-run-*"))  # wandb offline, no account
    # the argparse CLIs, in this process (their subprocess path is the same main(); bad input runs them as such too)
    monkeypatch.chdir(cwd)
    code, err, planned = run_in_process("asft_repro.plan", ["method=base,asft", *sweep_overrides(demo_data)],
                                        monkeypatch, capsys)
    assert code == 0, err[-2000:]
    launched = [name for name in runs if "-asft-" in name or "-base-" in name]
    assert all(f"| {name}" in planned for name in launched) and planned.count("| done") == 2  # named as the launch did
    assert not (cwd / "run.log").exists()
    code, err, table = run_in_process("asft_repro.tables", ["--experiment", "demo", "--no-wandb"], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    assert "## table1_math_demo_tiny" in table and "paper Math Avg" in table and "| Base |" in table
    code, err, _ = run_in_process("asft_repro.plots", ["--experiment", "demo"], monkeypatch, capsys)
    assert code == 0 and list((cwd / "outputs" / "plots").glob("kl_drift_demo_*.png"))


def test_training_logs_falling_loss_and_kl_from_zero(trained):
    _root, dirs = trained
    sft = metrics_rows(dirs["sft"])
    assert len(sft) == 16
    assert sft[0]["kl_forward"] == pytest.approx(0.0, abs=1e-4)  # policy == base before the first update
    assert sft[-1]["ce"] < 0.6 * sft[0]["ce"]
    for row in sft:
        assert {"ce", "dft", "kl_forward", "kl_reverse", "token_prob_mean", "dft_weight_ess", "learning_rate", "grad_norm"} <= set(row)


def test_asft_anchor_keeps_kl_below_dft(trained):
    _root, dirs = trained
    dft_kl = [r["kl_forward"] for r in metrics_rows(dirs["dft"])]
    asft_kl = [r["kl_forward"] for r in metrics_rows(dirs["asft"])]
    assert dft_kl[-1] > dft_kl[1]  # DFT drifts
    assert sum(asft_kl[-4:]) < sum(dft_kl[-4:])


def test_eval_metrics_written(trained):
    _root, dirs = trained
    (metrics_file,) = (dirs["asft"] / "eval").glob("*/metrics.json")  # eval/<settings_hash>/metrics.json
    metrics = json.loads(metrics_file.read_text())
    assert metrics_file.parent.name == metrics["settings_hash"]
    assert set(metrics["benchmarks"]) == {"math500", "minerva", "olympiadbench", "aime24", "amc23"}
    assert all(b["num_items"] == 4 for b in metrics["benchmarks"].values())
    assert metrics["averages"]["Math Avg"] is not None and metrics["averages"]["Medical Avg"] is None
    lines = (metrics_file.parent / "math500.jsonl").read_text().splitlines()
    assert len(lines) == 4 and {"outputs", "parsed", "correct"} <= set(json.loads(lines[0]))


def test_rerun_refuses_and_resume_reuses(trained, demo_data):
    _root, dirs = trained
    cell = [*sweep_overrides(demo_data), "method=sft", f"output_dir={dirs['sft']}"]
    with pytest.raises(RunDirError, match="train.resume=true"):
        run(compose_config("config", cell))
    before = (dirs["sft"] / "metrics.jsonl").read_text()
    final = dirs["sft"] / "final" / "model.safetensors"
    saved = final.stat().st_mtime_ns
    record = json.loads((dirs["sft"] / "run.json").read_text())
    assert record["model_path"] == str(dirs["sft"] / "final")  # absolute: the sweep ran in another cwd than this test
    run(compose_config("config", [*cell, "train.resume=true"]))
    assert (dirs["sft"] / "metrics.jsonl").read_text() == before  # nothing retrained or overwritten
    assert final.stat().st_mtime_ns == saved  # final/ reused as it is, not re-saved from the last checkpoint


def test_killed_run_resumes_from_checkpoint(tmp_path, demo_data, tiny_model_path):
    import shutil

    cfg = train_cfg(tmp_path, demo_data, "method=asft", "train.save_strategy=steps", "train.save_steps=4",
                    "train.max_steps=6", "eval.after_train=false")
    out = run(cfg)
    # simulate a kill after step 6: a checkpoint at step 4, the record not complete, rows after step 4 logged
    record = json.loads((out / "run.json").read_text())
    record["train_status"] = "running"
    (out / "run.json").write_text(json.dumps(record))
    shutil.rmtree(out / "final")
    for later in out.glob("checkpoint-6"):
        shutil.rmtree(later)
    with pytest.raises(RunDirError, match="unfinished run"):
        run(cfg)
    resumed = compose_config("config", [*cfg_overrides(tmp_path, demo_data), "train.max_steps=6", "train.resume=true"])
    assert run(resumed) == out  # same config, same directory
    steps = [r["step"] for r in metrics_rows(out)]
    assert steps == list(range(1, 7))  # steps 5-6 re-run once, not duplicated
    with pytest.raises(RunDirError, match="train.max_steps: 6 -> 8"):  # another schedule is another run
        run(compose_config("config", [*cfg_overrides(tmp_path, demo_data), "train.max_steps=8", "train.resume=true",
                                      f"output_dir={out}"]))


def cfg_overrides(tmp_path, demo_data):
    return ["experiment=demo", f"data.data_dir={demo_data}", f"output_dir={tmp_path}/${{run_name}}", "train.report_to=[]",
            "data.size=64", "method=asft", "train.save_strategy=steps", "train.save_steps=4", "eval.after_train=false",
            "train.num_epochs=2"]


def test_base_method_and_medical_eval(tmp_path, demo_data, tiny_model_path):
    out = run(train_cfg(tmp_path, demo_data, "method=base", "data=demo_medical", "data.size=64"))
    (metrics_file,) = (out / "eval").glob("*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert set(metrics["benchmarks"]) == {"mmlu_medical", "medqa", "medmcqa"}
    assert metrics["benchmarks"]["mmlu_medical"]["num_items"] == 36  # six subjects pooled, 6 each
    assert metrics["benchmarks"]["medqa"]["unparsed"] == 0  # loglik mode always picks a letter
    assert metrics["averages"]["Medical Avg"] is not None
    assert not (out / "metrics.jsonl").exists()


def test_tables_and_plots(trained, tmp_path):
    from asft_repro.plots import write_plots
    from asft_repro.tables import write_tables

    root, dirs = trained
    tables = write_tables(root.parent, tmp_path / "tables", "demo", use_wandb=False)
    math = tables["table1_math_demo_tiny"].frame
    assert list(math.index) == ["Base", "64 SFT", "64 DFT", "64 ASFT"]
    assert math["n_runs"].tolist() == [1, 1, 1, 1]  # the resumed SFT cell is still one run, scored once
    assert math["paper Math Avg"].isna().all()  # the tiny model has no paper cell: missing, not zero
    assert str(dirs["asft"]) in math.loc["64 ASFT", "run_dirs"]
    for ext in ("md", "csv", "tex"):
        assert (tmp_path / "tables" / f"table1_math_demo_tiny.{ext}").exists()
    pngs = write_plots(root.parent, tmp_path / "plots", "demo")
    assert len(pngs) == 1 and pngs[0].stat().st_size > 10_000


def test_nan_loss_stops_with_a_clear_error(tmp_path, demo_data, tiny_model_path):
    from asft_repro.trainer import NonFiniteLossError

    cfg = train_cfg(tmp_path, demo_data, "method=sft", "train.learning_rate=1e30", "train.max_grad_norm=1e30",
                    "eval.after_train=false")
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        run(cfg)


def test_resolved_config_saved(trained):
    _root, dirs = trained
    saved = OmegaConf.load(dirs["asft"] / "config.yaml")
    assert saved.method.name == "asft" and "${" not in OmegaConf.to_yaml(saved)
    record = json.loads((dirs["asft"] / "run.json").read_text())
    assert record["train_status"] == "complete" and len(record["data_manifest"]["sha256"]) == 64
