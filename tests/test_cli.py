"""The commands users type: a Hydra multirun sweep, then the tables and plots CLIs, and CLI errors."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_multirun_sweep_then_table_and_plots(tmp_path, demo_data, tiny_model_path):
    sweep = cli("asft_repro.train", "-m", "experiment=demo", "method=base,dft,asft", f"data.data_dir={demo_data}",
                f"eval.benchmarks_dir={demo_data}/benchmarks", "data.size=64", "train.max_steps=4",
                "train.report_to=[wandb]", "eval.limit=3", "eval.max_new_tokens=8", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    runs = sorted(p.name for p in (tmp_path / "outputs" / "demo").iterdir() if p.is_dir())
    patterns = [r"tiny-numina_cot-64-asft-kl0\.05-s42-max_steps_4-[0-9a-f]{8}", r"tiny-numina_cot-64-dft-s42-max_steps_4-[0-9a-f]{8}",
                r"tiny-math-base-[0-9a-f]{8}"]  # the swept value is spelt out, the hash names the whole config
    assert sorted(runs) == runs and all(any(re.fullmatch(p, r) for r in runs) for p in patterns) and len(runs) == 3
    asft_run = next(r for r in runs if "-asft-" in r)
    assert list((tmp_path / "outputs" / "demo" / asft_run / "wandb").glob("offline-run-*"))  # wandb offline, no account
    planned = cli("asft_repro.plan", "experiment=demo", "method=base,dft,asft", f"data.data_dir={demo_data}",
                  "data.size=64", "train.max_steps=4", "train.report_to=[wandb]", "eval.limit=3", cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert all(f"| {name}" in planned.stdout and "| done" in planned.stdout for name in runs)  # plan names runs as the launch did
    assert not (tmp_path / "run.log").exists()

    table = cli("asft_repro.tables", "--experiment", "demo", cwd=tmp_path)
    assert table.returncode == 0, table.stderr[-2000:]
    assert "## table1_math_demo_tiny" in table.stdout and "paper Math Avg" in table.stdout and "| Base |" in table.stdout
    plots = cli("asft_repro.plots", "--experiment", "demo", cwd=tmp_path)
    assert plots.returncode == 0 and list((tmp_path / "outputs" / "plots").glob("kl_drift_demo_*.png"))


def test_cli_errors_are_one_line(tmp_path):
    missing = cli("asft_repro.train", "data.data_dir=/nonexistent", "eval.after_train=false", cwd=tmp_path)
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines()[-1].startswith("asft_repro.train: training data /nonexistent/")
    bad = cli("asft_repro.train", "method.kl_coef=-1", cwd=tmp_path)
    assert bad.stderr.strip().splitlines()[-1] == "asft_repro.train: method.kl_coef=-1.0 is invalid; set it to 0 or more"
    unknown = cli("eval.run", "benchmarks=[gsm8k]", cwd=tmp_path)
    assert "unknown benchmark 'gsm8k'" in unknown.stderr.strip().splitlines()[-1]
    no_tables = cli("asft_repro.tables", cwd=tmp_path)
    assert no_tables.returncode != 0 and no_tables.stderr.strip().splitlines()[-1].startswith("asft_repro.tables: ")
    assert ROOT.exists()
