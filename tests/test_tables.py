"""Tables and plots on synthetic run directories written in the on-disk contract (no training)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from asft_repro.plots import write_plots
from asft_repro.tables import main as tables_main
from asft_repro.tables import write_tables
from conftest import run_in_process

MATH = ["math500", "minerva", "olympiadbench", "aime24", "amc23"]
MEDICAL = ["mmlu_medical", "medqa", "medmcqa"]


def make_run(root: Path, name: str, *, experiment: str = "exp", model: str = "qwen2.5-7b", domain: str = "math",
             data: str = "numina_cot", size: str = "10k", method: str = "sft", kl_coef: float = 0.05,
             direction: str = "forward", seed: int = 42, score: float = 10.0, temperatures: tuple[float, ...] = (0.0,),
             collapsed: bool = False, reason: str = "", curves: list[dict] | None = None, torn: bool = False,
             benchmarks: list[str] | None = None, lr: float = 5e-5, anchor: str = "exact") -> Path:
    """One run dir exactly as the writers lay it out; every benchmark scores ``score``.

    One eval settings folder per temperature, the i-th adding i to the scores; the settings fingerprint the run's
    own model, so settings hashes always differ between runs (as the real evaluator's do).
    """
    run = root / experiment / name
    run.mkdir(parents=True)
    cfg = {"experiment_name": experiment, "model": {"name": model, "path": f"/models/{model}"},
           "data": {"name": data, "domain": domain, "size": size},
           "method": {"name": method, "kl_coef": kl_coef, "kl_direction": direction, "anchor": anchor, "anchor_k": 128},
           "train": {"seed": seed, "learning_rate": lr, "global_batch_size": 256}, "wandb": {"project": "asft-repro"}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    identity = {"model.name": model, "data.name": data, "data.size": size, "method.name": method, "train.seed": seed,
                "train.learning_rate": lr, **({"method.kl_coef": kl_coef} if method in ("asft", "sft_kl") else {}),
                **({"method.anchor": anchor, "method.anchor_k": 128} if anchor == "cache" else {})}
    record = {"train_status": "complete", "config_hash": f"{abs(hash(name)) % 16**12:012x}", "identity": identity,
              "data_manifest": {"sha256": "0" * 64}}
    if collapsed:
        record.update(collapsed=True, collapse_reason=reason)
    (run / "run.json").write_text(json.dumps(record))
    names = benchmarks if benchmarks is not None else (MATH if domain == "math" else MEDICAL)
    for i, temperature in enumerate(temperatures):
        bench = {b: {"accuracy": score + i, "num_items": 10, "num_samples": 10, "unparsed": 0} for b in names}
        avg = sum(b["accuracy"] for b in bench.values()) / len(bench) if bench else None
        fingerprint = {"model": {"path": str(run / "final"), "weights": {"model.safetensors": {"size": 1, "mtime_ns": i}}},
                       "template": "alpaca", "mc_mode": "loglik", "temperature": temperature, "limit": None}
        settings_hash = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
        metrics = {"model_path": str(run / "final"), "settings_hash": settings_hash, "settings": fingerprint, "benchmarks": bench,
                   "averages": {"Math Avg": avg if domain == "math" else None, "Medical Avg": avg if domain == "medical" else None},
                   "sampling": {}, "template": "alpaca"}
        (run / "eval" / settings_hash).mkdir(parents=True)
        (run / "eval" / settings_hash / "metrics.json").write_text(json.dumps(metrics))
    if curves is not None:
        text = "".join(json.dumps(row) + "\n" for row in curves)
        (run / "metrics.jsonl").write_text(text + ('{"step": 99, "loss": 1.' if torn else ""))
    return run


def curve(n: int = 5, drift: float = 0.1) -> list[dict]:
    return [{"step": s, "loss": 2.0 / s, "ce": 2.0 / s, "dft": 1.0, "kl_forward": drift * s, "kl_reverse": drift * s,
             "dft_weight_ess": 0.5, "token_prob_mean": 0.3, "learning_rate": 1e-5, "grad_norm": 1.0} for s in range(1, n + 1)]


def tables_of(root: Path, tmp_path: Path, experiment: str | None = None) -> dict:
    return write_tables(root, tmp_path / "tables", experiment, use_wandb=False)


def test_base_rows_of_different_models_are_not_averaged(tmp_path):
    root = tmp_path / "outputs"
    make_run(root, "tiny-base", model="tiny", method="base", score=1.0)
    make_run(root, "qwen-base", model="qwen2.5-7b", method="base", score=20.0)
    tables = tables_of(root, tmp_path)
    assert set(tables) == {"table1_math_exp_qwen2.5-7b", "table1_math_exp_tiny"}
    qwen, tiny = tables["table1_math_exp_qwen2.5-7b"].frame, tables["table1_math_exp_tiny"].frame
    assert list(qwen.index) == ["Base"] and qwen.loc["Base", "n_runs"] == 1 and qwen.loc["Base", "Math Avg"] == 20.0
    assert tiny.loc["Base", "Math Avg"] == 1.0


def test_lambda_and_direction_runs_stay_out_of_table1(tmp_path):
    root = tmp_path / "outputs"
    make_run(root, "asft", method="asft", score=10.0)
    make_run(root, "asft-l01", method="asft", kl_coef=0.1, score=30.0)
    make_run(root, "asft-l02", method="asft", kl_coef=0.2, score=40.0)
    make_run(root, "asft-rev", method="asft", direction="reverse", score=50.0)
    make_run(root, "sft", method="sft", kl_coef=0.3, direction="reverse", score=5.0)  # λ/direction ignored for sft
    tables = tables_of(root, tmp_path)
    t1 = tables["table1_math_exp_qwen2.5-7b"].frame
    assert list(t1.index) == ["10k SFT", "10k ASFT"]
    assert t1["n_runs"].tolist() == [1, 1] and t1.loc["10k ASFT", "Math Avg"] == 10.0
    lam = tables["ablation_lambda_math_exp_qwen2.5-7b"].frame
    assert list(lam.index) == ["10k ASFT λ=0.05 forward", "10k ASFT λ=0.1 forward", "10k ASFT λ=0.2 forward"]
    assert lam["Math Avg"].tolist() == [10.0, 30.0, 40.0]
    direction = tables["ablation_kl_direction_math_exp_qwen2.5-7b"].frame
    assert list(direction.index) == ["10k ASFT λ=0.05 forward", "10k ASFT λ=0.05 reverse"]
    assert pd.isna(lam.loc["10k ASFT λ=0.1 forward", "paper Math Avg"])  # not the paper's cell


def test_no_ablation_tables_without_ablation_runs(tmp_path):
    root = tmp_path / "outputs"
    make_run(root, "asft", method="asft")
    make_run(root, "sft", method="sft")
    assert set(tables_of(root, tmp_path)) == {"table1_math_exp_qwen2.5-7b"}


def test_experiments_under_one_root_never_mix(tmp_path):
    root = tmp_path / "outputs"
    make_run(root, "sft", experiment="a", score=10.0)
    make_run(root, "sft", experiment="b", score=30.0)
    tables = tables_of(root, tmp_path)
    assert tables["table1_math_a_qwen2.5-7b"].frame["Math Avg"].tolist() == [10.0]
    assert tables["table1_math_b_qwen2.5-7b"].frame["Math Avg"].tolist() == [30.0]
    only_b = write_tables(root, tmp_path / "only_b", "b", use_wandb=False)
    assert set(only_b) == {"table1_math_b_qwen2.5-7b"}


def test_seeds_are_averaged_with_std_and_integer_count(tmp_path):
    root = tmp_path / "outputs"
    for seed, score in [(1, 10.0), (2, 12.0), (3, 14.0)]:
        make_run(root, f"dft-s{seed}", method="dft", seed=seed, score=score)
    table = tables_of(root, tmp_path)["table1_math_exp_qwen2.5-7b"]
    row = table.frame.loc["10k DFT"]
    assert row["Math Avg"] == pytest.approx(12.0) and row["Math Avg std"] == pytest.approx(2.0)
    assert row["n_runs"] == 3 and isinstance(row["n_runs"], (int, type(table.frame["n_runs"].iloc[0])))
    assert str(table.frame["n_runs"].dtype).startswith("int")
    assert table.display().loc["10k DFT", "Math500"] == "12.00 (sd 2.00)"  # no records here: no interval, no ±
    assert table.display().loc["10k DFT", "n_runs"] == "3"


def test_runs_trained_differently_are_not_seeds_of_one_cell(tmp_path):
    root = tmp_path / "outputs"
    make_run(root, "dft-lr1", method="dft", lr=1e-5, score=10.0)
    make_run(root, "dft-lr2", method="dft", lr=2e-5, score=20.0)
    make_run(root, "dft-lr2-s2", method="dft", lr=2e-5, seed=2, score=22.0)
    frame = tables_of(root, tmp_path)["table1_math_exp_qwen2.5-7b"].frame
    assert sorted(frame.index) == ["10k DFT learning_rate=1e-05", "10k DFT learning_rate=2e-05"]
    assert frame.loc["10k DFT learning_rate=2e-05", "n_runs"] == 2
    assert frame.loc["10k DFT learning_rate=2e-05", "Math Avg"] == pytest.approx(21.0)


def test_eval_settings_are_never_mixed(tmp_path):
    root = tmp_path / "outputs"
    make_run(root, "sft", temperatures=(0.0, 0.6), score=10.0)
    make_run(root, "dft", method="dft", temperatures=(0.0,), score=20.0)
    tables = sorted(tables_of(root, tmp_path).values(), key=lambda t: t.frame["Math Avg"].iloc[0])
    assert len(tables) == 2 and all(t.name.startswith("table1_math_exp_qwen2.5-7b_") for t in tables)
    greedy, sampled = tables
    assert greedy.frame["Math Avg"].tolist() == [10.0, 20.0] and list(greedy.frame.index) == ["10k SFT", "10k DFT"]
    assert sampled.frame["Math Avg"].tolist() == [11.0] and "temperature=0.6" in sampled.title


def test_runs_scored_alike_share_one_table_though_their_settings_hashes_differ(tmp_path):
    root = tmp_path / "outputs"
    a, b = make_run(root, "sft", score=10.0), make_run(root, "dft", method="dft")
    assert {p.parent.name for p in a.glob("eval/*/metrics.json")} != {p.parent.name for p in b.glob("eval/*/metrics.json")}
    assert list(tables_of(root, tmp_path)) == ["table1_math_exp_qwen2.5-7b"]


def test_paper_average_only_where_model_domain_and_size_match(tmp_path):
    root = tmp_path / "outputs"
    make_run(root, "q-asft", method="asft", score=30.0)
    make_run(root, "q-asft-64", method="asft", size="64")
    make_run(root, "t-asft", model="tiny", method="asft")
    make_run(root, "l-math", model="llama2-7b", method="sft")  # llama is the paper's medical model, not its math one
    make_run(root, "l-base", model="llama2-7b", domain="medical", data="medmcqa", method="base", score=30.0)
    tables = tables_of(root, tmp_path)
    qwen = tables["table1_math_exp_qwen2.5-7b"]
    assert qwen.frame.loc["10k ASFT", "paper Math Avg"] == 28.75
    assert qwen.frame.loc["10k ASFT", "diff vs paper"] == pytest.approx(1.25)
    assert qwen.display().loc["10k ASFT", "diff vs paper"] == "+1.25"
    assert qwen.display().loc["64 ASFT", "paper Math Avg"] == "-"
    assert tables["table1_math_exp_tiny"].display().loc["10k ASFT", "paper Math Avg"] == "-"
    assert tables["table1_math_exp_llama2-7b"].frame["paper Math Avg"].isna().all()
    assert tables["table1_medical_exp_llama2-7b"].frame.loc["Base", "paper Medical Avg"] == 31.38


def test_columns_in_paper_order_with_dash_for_missing(tmp_path):
    root = tmp_path / "outputs"
    make_run(root, "med", domain="medical", data="medmcqa", model="llama2-7b", benchmarks=["medqa", "medmcqa"])
    shown = tables_of(root, tmp_path)["table1_medical_exp_llama2-7b"].display()
    assert list(shown.columns) == ["MMLU-medical", "MedQA", "MedMCQA", "Medical Avg", "paper Medical Avg",
                                   "diff vs paper", "n_runs"]
    assert shown.loc["10k SFT", "MMLU-medical"] == "-" and shown.loc["10k SFT", "MedQA"] == "10.00"
    make_run(root, "math", benchmarks=MATH)
    shown = tables_of(root, tmp_path)["table1_math_exp_qwen2.5-7b"].display()
    assert list(shown.columns)[:6] == ["Math500", "Minerva", "OlympiadBench", "AIME24", "AMC23", "Math Avg"]


def test_collapsed_runs_are_labelled_and_footnoted(tmp_path):
    root = tmp_path / "outputs"
    make_run(root, "dft-s1", method="dft", seed=1, score=20.0)
    make_run(root, "dft-s2", method="dft", seed=2, score=22.0)
    bad = make_run(root, "dft-s3", method="dft", seed=3, score=0.0, collapsed=True, reason="uniform token probability")
    table = tables_of(root, tmp_path)["table1_math_exp_qwen2.5-7b"]
    assert list(table.frame.index) == ["10k DFT", "10k DFT (collapsed)"]
    assert table.frame.loc["10k DFT", "Math Avg"] == pytest.approx(21.0)  # the collapsed seed is not averaged in
    note = [n for n in table.footnotes if "collapsed" in n]
    assert len(note) == 1 and str(bad) in note[0] and "uniform token probability" in note[0]
    assert "10k DFT (collapsed)" in table.markdown() and str(bad) in table.markdown()


def test_markdown_csv_latex_written_with_provenance(tmp_path, capsys):
    root = tmp_path / "outputs"
    a = make_run(root, "sft-s1", seed=1)
    b = make_run(root, "sft-s2", seed=2)
    make_run(root, "base", method="base", benchmarks=MATH[:4])  # AMC23 missing: a dash
    tables = tables_of(root, tmp_path)
    out = tmp_path / "tables"
    name = "table1_math_exp_qwen2.5-7b"
    md = (out / f"{name}.md").read_text()
    assert "| Base |" in md and "| 10k SFT |" in md and "('" not in md and md in capsys.readouterr().out
    csv = pd.read_csv(out / f"{name}.csv")
    row = csv[csv["row"] == "10k SFT"].iloc[0]
    assert row["run_dirs"] == f"{a};{b}" and len(row["config_hashes"].split(";")) == 2
    assert {"experiment", "model", "domain", "size", "method", "eval_key", "settings_hashes", "Math Avg std"} <= set(csv.columns)
    tex = (out / f"{name}.tex").read_text()
    assert r"\toprule" in tex and "10k SFT" in tex and "(sd 0.00)" in tex and "--" in tex
    assert list(tables) == [name]


def test_tables_cli_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit) as missing:
        tables_main(["--root", str(tmp_path / "missing"), "--no-wandb"])
    assert str(missing.value.code).startswith("asft_repro.tables: no directory") and "\n" not in str(missing.value.code)
    (tmp_path / "empty" / "exp" / "run").mkdir(parents=True)
    with pytest.raises(SystemExit) as empty:
        tables_main(["--root", str(tmp_path / "empty"), "--no-wandb"])
    assert str(empty.value.code).startswith("asft_repro.tables: no run with eval/") and "; " in str(empty.value.code)


def test_tables_logged_to_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = tmp_path / "outputs"
    make_run(root, "sft", experiment="demo")
    write_tables(root, tmp_path / "tables", None, use_wandb=True)
    runs = list((tmp_path / "tables" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_plots_group_by_config_not_directory_name(tmp_path):
    root = tmp_path / "outputs"
    make_run(root, "qwen2.5-7b-numina_cot-10k-sft-s42", size="10k", curves=curve())
    make_run(root, "qwen2.5-7b-numina_cot-30k-sft-s42", size="30k", curves=curve())
    make_run(root, "misleading-name", size="10k", method="asft", kl_coef=0.1, curves=curve(), torn=True)
    before = (root / "exp" / "misleading-name" / "metrics.jsonl").read_text()
    pngs = write_plots(root, tmp_path / "plots")
    assert sorted(p.name for p in pngs) == ["kl_drift_exp_qwen2.5-7b_numina_cot_10k.png",
                                            "kl_drift_exp_qwen2.5-7b_numina_cot_30k.png"]
    assert all(p.stat().st_size > 10_000 for p in pngs)
    assert (root / "exp" / "misleading-name" / "metrics.jsonl").read_text() == before  # plotting never edits a run


def test_plot_labels_read_the_config(tmp_path):
    from asft_repro.plots import find_runs

    root = tmp_path / "outputs"
    make_run(root, "a", method="asft", curves=curve())
    make_run(root, "b", method="asft", kl_coef=0.1, direction="reverse", curves=curve())
    make_run(root, "c", method="dft", collapsed=True, curves=curve())
    labels = sorted(r.label(False) for r in find_runs(root))
    assert labels == ["ASFT", "ASFT λ=0.1 reverse", "DFT (collapsed)"]


def test_cached_anchor_runs_are_told_apart_in_tables_and_plots(tmp_path):
    from asft_repro.plots import find_runs

    root = tmp_path / "outputs"
    make_run(root, "exact", method="asft", score=10.0, curves=curve())
    make_run(root, "cached", method="asft", anchor="cache", score=12.0, curves=curve())
    assert sorted(r.label(False) for r in find_runs(root)) == ["ASFT", "ASFT cached anchor k=128"]
    frame = tables_of(root, tmp_path)["table1_math_exp_qwen2.5-7b"].frame
    assert sorted(frame.index) == ["10k ASFT anchor=cache anchor_k=128", "10k ASFT anchor=exact anchor_k=-"]
    assert frame.loc["10k ASFT anchor=cache anchor_k=128", "Math Avg"] == pytest.approx(12.0)


def test_plots_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    code, err, _ = run_in_process("asft_repro.plots", ["--root", str(tmp_path / "missing")], monkeypatch, capsys)
    assert code != 0 and "Traceback" not in err
    assert err.strip().startswith("asft_repro.plots: no directory") and len(err.strip().splitlines()) == 1
    make_run(tmp_path / "outputs", "base", method="base")  # evaluated, but no metrics.jsonl
    with pytest.raises(SystemExit, match="^asft_repro.plots: no metrics.jsonl"):
        write_plots(tmp_path / "outputs", tmp_path / "plots")
