"""Intervals, paired comparisons, † marks, scores.csv and comparisons.csv on hand-built run directories with
per-sample records (no training), and on the demo's records when `make demo` has written them."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from asft_repro import stats
from asft_repro.intervals import COMPARISON_FIELDS, SCORE_FIELDS
from asft_repro.records import read_records
from asft_repro.tables import write_tables
from test_stats import mcnemar_exact
from test_tables import MATH, make_run

ROOT = Path(__file__).resolve().parent.parent
MMLU = ["mmlu_anatomy", "mmlu_clinical_knowledge", "mmlu_college_biology", "mmlu_college_medicine",
        "mmlu_medical_genetics", "mmlu_professional_medicine"]


def with_records(run: Path, correct: dict[str, list], drop: dict[str, int] | None = None) -> Path:
    """Write ``<benchmark>.jsonl`` into the run's eval folder: item i of benchmark b is right per ``correct[b][i]``
    (a bool, or a list per sample); mmlu_medical's items are spread over its six subjects with repeating ids.
    metrics.json's scores are set from the records; ``drop``: benchmark -> how many last items to leave out."""
    (eval_dir,) = [p.parent for p in run.glob("eval/*/metrics.json")]
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    metrics["benchmarks"] = {}
    for name, items in correct.items():
        items = items[:len(items) - (drop or {}).get(name, 0)]
        records = []
        for i, c in enumerate(items):
            samples = c if isinstance(c, list) else [c]
            bench, item_id = (MMLU[i % 6], str(i // 6)) if name == "mmlu_medical" else (name, str(i))
            records.append({"id": item_id, "benchmark": bench, "outputs": [f"answer {i}"] * len(samples),
                            "parsed": ["x"] * len(samples), "correct": [bool(s) for s in samples], "answer": "x"})
        (eval_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        first = [r["correct"][0] for r in records]
        metrics["benchmarks"][name] = {"accuracy": 100 * float(np.mean(first)), "num_items": len(first)}
    scores = [b["accuracy"] for b in metrics["benchmarks"].values()]
    domain = "math" if "math500" in correct else "medical"
    metrics["averages"] = {"Math Avg": float(np.mean(scores)) if domain == "math" else None,
                           "Medical Avg": float(np.mean(scores)) if domain == "medical" else None}
    (eval_dir / "metrics.json").write_text(json.dumps(metrics))
    return run


def bits(n: int, right: int, offset: int = 0) -> list[bool]:
    """n items, ``right`` of them right, starting at item ``offset`` (wrapping)."""
    return [((i - offset) % n) < right for i in range(n)]


def math_runs(root: Path) -> dict[str, Path]:
    """Base, SFT, DFT, ASFT at 10k on the five math benchmarks (20 items each), close to each other."""
    specs = {"base": 6, "sft": 8, "dft": 9, "asft": 10}
    return {m: with_records(make_run(root, m, method=m), {b: bits(20, right, offset=j) for j, b in enumerate(MATH)})
            for m, right in specs.items()}


def test_scores_and_comparisons_csv(tmp_path):
    root = tmp_path / "outputs"
    runs = math_runs(root)
    tables = write_tables(root, tmp_path / "tables", use_wandb=False)
    scores = pd.read_csv(tmp_path / "tables" / "scores.csv", keep_default_na=False, na_values=[""])
    assert list(scores.columns) == SCORE_FIELDS and len(scores) == 4 * 6 * 2
    sft = scores[(scores["method"] == "sft") & (scores["metric"] == "acc")].set_index("benchmark")
    assert sft.loc["math500", "value"] == pytest.approx(40.0) and sft.loc["Math Avg", "value"] == pytest.approx(40.0)
    assert sft.loc["math500", "stderr"] == pytest.approx(100 * math.sqrt(0.4 * 0.6 / 20))
    assert (sft["ci_low"] < sft["value"]).all() and (sft["value"] < sft["ci_high"]).all()
    assert sft.loc["Math Avg", "n_items"] == 100 and sft.loc["math500", "run_dirs"] == str(runs["sft"])
    assert sft.loc["Math Avg", "ci_high"] - sft.loc["Math Avg", "ci_low"] < sft.loc["math500", "ci_high"] - sft.loc["math500", "ci_low"]

    comparisons = pd.read_csv(tmp_path / "tables" / "comparisons.csv", keep_default_na=False, na_values=[""])
    assert list(comparisons.columns) == COMPARISON_FIELDS and len(comparisons) == 6 * 6 * 2
    pairs = set(zip(comparisons["method_a"], comparisons["method_b"]))
    assert pairs == {("ASFT", "DFT"), ("ASFT", "SFT"), ("DFT", "SFT"), ("SFT", "Base"), ("DFT", "Base"), ("ASFT", "Base")}
    row = comparisons[(comparisons["method_a"] == "ASFT") & (comparisons["method_b"] == "SFT")
                      & (comparisons["benchmark"] == "math500") & (comparisons["metric"] == "acc")].iloc[0]
    a = np.array(bits(20, 10)), np.array(bits(20, 8))
    b, c = int(np.sum(a[0] & ~a[1])), int(np.sum(~a[0] & a[1]))
    assert row["delta"] == pytest.approx(10.0) and row["p_value"] == pytest.approx(mcnemar_exact(b, c), rel=1e-9)
    assert row["size"] == "10k" and row["n_items"] == 20 and row["test"] == "exact"
    assert row["mde"] == pytest.approx(100 * stats.mde_from_discordance([20], (b + c) / 20))
    acc = comparisons[comparisons["metric"] == "acc"]
    assert acc["p_holm"].tolist() == pytest.approx(stats.holm(acc["p_value"].tolist()))  # one family per table and metric
    table = tables["table1_math_exp_qwen2.5-7b"]
    shown = table.display()
    assert shown.loc["10k SFT", "Math500"] == "40.00 ± 20.00" and not shown.map(lambda v: "†" in v).any().any()
    assert any("no difference is significant" in n for n in table.footnotes)
    assert any(n.startswith("smallest paired difference") and "AIME24" in n for n in table.footnotes)


def medical_runs(root: Path) -> None:
    """LLaMA-2-7B medical at 10k: SFT right on 80% of 120 items per benchmark, DFT the same, ASFT on 42%."""
    def run(name: str, method: str, right: int, offset: int = 0) -> None:
        correct = {b: bits(120, right, offset) for b in ("mmlu_medical", "medqa", "medmcqa")}
        with_records(make_run(root, name, model="llama2-7b", domain="medical", data="medmcqa", method=method), correct)
    run("sft", "sft", 96)
    run("dft", "dft", 96, offset=3)
    run("asft", "asft", 50)


def test_significant_differences_are_marked_and_the_paper_is_placed(tmp_path):
    root = tmp_path / "outputs"
    medical_runs(root)
    table = write_tables(root, tmp_path / "tables", use_wandb=False)["table1_medical_exp_llama2-7b"]
    shown = table.display()
    assert shown.loc["10k ASFT", "Medical Avg"].endswith("†") and "†" in shown.loc["10k ASFT", "MedQA"]
    assert "†" not in shown.loc["10k DFT", "Medical Avg"] and "†" not in shown.loc["10k SFT", "Medical Avg"]
    assert table.frame.loc["10k ASFT", "Medical Avg n_items"] == 360  # mmlu_medical's repeating ids paired by subject
    assert shown.loc["10k ASFT", "paper in 95% CI"] == "yes"  # paper 42.03, ours 41.67 ± ~5
    assert shown.loc["10k SFT", "paper in 95% CI"] == "no"  # paper 33.37, ours 80
    assert any("10k ASFT on Medical Avg" in n for n in table.footnotes)
    assert r"$^\dagger$" in table.latex() and "paper in 95% CI" in table.markdown()


def test_a_comparison_on_different_items_is_refused_with_one_line(tmp_path, caplog):
    root = tmp_path / "outputs"
    correct = {b: bits(20, 8) for b in MATH}
    with_records(make_run(root, "sft", method="sft"), correct)
    with_records(make_run(root, "dft", method="dft"), correct, drop={"math500": 1})
    with caplog.at_level(logging.WARNING, logger="asft_repro.intervals"):
        write_tables(root, tmp_path / "tables", use_wandb=False)
    refused = [r.getMessage() for r in caplog.records if "not compared" in r.getMessage()]
    assert len(refused) == 2 and all("\n" not in m and "item sets differ on math500 (0 only in the first, 1 only in "
                                     "the second)" in m for m in refused)  # math500 and the average, once each
    comparisons = pd.read_csv(tmp_path / "tables" / "comparisons.csv")
    assert set(comparisons["benchmark"]) == set(MATH) - {"math500"}


def test_seeds_widen_the_interval_and_report_their_std(tmp_path):
    root = tmp_path / "outputs"
    for seed, right in [(1, 6), (2, 14)]:
        with_records(make_run(root, f"asft-s{seed}", method="asft", seed=seed), {b: bits(20, right) for b in MATH})
    with_records(make_run(root, "asft-one", method="asft", seed=1, size="30k"), {b: bits(20, 10) for b in MATH})
    write_tables(root, tmp_path / "tables", use_wandb=False)
    scores = pd.read_csv(tmp_path / "tables" / "scores.csv", keep_default_na=False, na_values=[""])
    avg = scores[(scores["benchmark"] == "Math Avg") & (scores["metric"] == "acc")].set_index("size")
    assert avg.loc["10k", "n_runs"] == 2 and avg.loc["10k", "value"] == pytest.approx(50.0)
    assert avg.loc["10k", "seeds_std"] == pytest.approx(np.std([30.0, 70.0], ddof=1))
    width = avg["ci_high"] - avg["ci_low"]
    assert width["10k"] > 2 * width["30k"]  # seeds 40 points apart: the seed resampling carries it
    md = (tmp_path / "tables" / "table1_math_exp_qwen2.5-7b.md").read_text()
    assert "| 10k ASFT | 50.00 ± " in md and "(sd 28.28)" in md


def test_mean_acc_uses_every_sample(tmp_path):
    root = tmp_path / "outputs"
    correct = {b: [[True, False, False, False]] * 10 + [[False, True, True, True]] * 10 for b in MATH}
    with_records(make_run(root, "sft", method="sft"), correct)
    write_tables(root, tmp_path / "tables", use_wandb=False)
    scores = pd.read_csv(tmp_path / "tables" / "scores.csv").set_index(["benchmark", "metric"])
    assert scores.loc[("math500", "acc"), "value"] == pytest.approx(50.0)
    assert scores.loc[("math500", "mean_acc"), "value"] == pytest.approx(50.0)
    assert scores.loc[("math500", "mean_acc"), "stderr"] == pytest.approx(100 * 0.25 / math.sqrt(20))  # items 0.25 / 0.75


DEMO_TABLES = ROOT / "outputs" / "tables" / "demo"


@pytest.mark.skipif(not (DEMO_TABLES / "comparisons.csv").is_file(), reason="run `make demo` first")
def test_demo_comparisons_match_mcnemar_on_its_records():
    """Every exact one-benchmark acc comparison of the demo equals McNemar computed from the two runs' records."""
    scores = pd.read_csv(DEMO_TABLES / "scores.csv", keep_default_na=False, na_values=[""])
    comparisons = pd.read_csv(DEMO_TABLES / "comparisons.csv", keep_default_na=False, na_values=[""])
    cells = scores[(scores["metric"] == "acc") & (scores["n_runs"] == 1) & (scores["flag"].isna())]
    run_of = {(r["domain"], r["size"] if r["method"] != "base" else "", r["method"]): r["run_dirs"] for _, r in cells.iterrows()}
    label = {"Base": "base", "SFT": "sft", "DFT": "dft", "ASFT": "asft", "SFT+KL": "sft_kl"}
    checked = 0
    for _, row in comparisons[(comparisons["metric"] == "acc") & ~comparisons["benchmark"].str.endswith("Avg")].iterrows():
        if row["method_a"] not in label or row["method_b"] not in label:
            continue
        runs = [run_of.get((row["domain"], "" if label[m] == "base" else row["size"], label[m]))
                for m in (row["method_a"], row["method_b"])]
        if None in runs:
            continue
        records = [read_records(next(Path(r).glob("eval/*")), row["benchmark"]) for r in runs]
        first = [{k: bool(v["correct"][0]) for k, v in rec.items()} for rec in records]
        b = sum(first[0][k] and not first[1][k] for k in first[0])
        c = sum(first[1][k] and not first[0][k] for k in first[0])
        assert row["p_value"] == pytest.approx(mcnemar_exact(b, c), rel=1e-9), row.to_dict()
        assert row["delta"] == pytest.approx(100 * (b - c) / len(first[0]))
        checked += 1
    assert checked >= 10
