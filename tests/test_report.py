"""The reproduction report (asft_repro/report.py) on hand-built run directories: one self-contained page with the
tables, comparisons, KL figure, runs and per-sample browser (the page in a real browser: test_report_browser.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from asft_repro.records import question_texts
from asft_repro.report import _lambda_curve, main, write_report
from test_intervals import MMLU, bits, with_records
from test_tables import MATH, curve, make_run

MEDICAL = ["mmlu_medical", "medqa", "medmcqa"]
N_ITEMS = 12


def write_benchmarks(folder: Path) -> None:
    """Benchmark files as data_prep writes them: <name>/test.jsonl with id, benchmark, prompt (mmlu by subject)."""
    files = {b: N_ITEMS for b in MATH + ["medqa", "medmcqa"]} | {m: N_ITEMS // 6 for m in MMLU}
    for name, n in files.items():
        (folder / name).mkdir(parents=True)
        rows = [{"id": str(i), "benchmark": name, "prompt": f"Question {i} of {name}: what is {i} + {len(name)}?",
                 "answer": "x"} for i in range(n)]
        (folder / name / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_report_outputs(tmp_path: Path, kl_schedule: bool = False) -> tuple[Path, dict[str, int]]:
    """outputs/exp with math Base/SFT/DFT/ASFT and medical Base/SFT (records, curves), and one run never evaluated;
    returns the root and {benchmark: items the methods score differently}."""
    root, bench_dir = tmp_path / "outputs", tmp_path / "benchmarks"
    write_benchmarks(bench_dir)
    math_right = {"base": 3, "sft": 5, "dft": 6, "asft": 8}
    correct = {m: {b: bits(N_ITEMS, r, offset=j) for j, b in enumerate(MATH)} for m, r in math_right.items()}
    runs = [with_records(make_run(root, m, method=m, curves=None if m == "base" else curve(drift=0.05 * (i + 1))),
                         correct[m]) for i, m in enumerate(math_right)]
    medical = {m: {b: bits(N_ITEMS, r) for b in MEDICAL} for m, r in {"base": 4, "sft": 7}.items()}
    runs += [with_records(make_run(root, f"med-{m}", method=m, model="llama2-7b", domain="medical", data="medmcqa",
                                   curves=None if m == "base" else curve()), medical[m]) for m in medical]
    if kl_schedule:
        rows = [{**row, "kl_coef": 0.05 * row["step"]} for row in curve()]
        (root / "exp" / "asft" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for run in runs:  # where the evaluator read its benchmark files
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["eval"] = {"benchmarks_dir": str(bench_dir)}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    failed = root / "exp" / "sft-never-evaluated"
    failed.mkdir()
    (failed / "config.yaml").write_text((runs[1] / "config.yaml").read_text())
    (failed / "run.json").write_text(json.dumps({"train_status": "failed"}))
    differ = {b: sum(len({correct[m][b][i] for m in correct}) > 1 for i in range(N_ITEMS)) for b in MATH}
    differ |= {b: sum(medical["base"][b][i] != medical["sft"][b][i] for i in range(N_ITEMS)) for b in MEDICAL}
    return root, differ


def run_names(root: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(root)) for p in root.glob("*/*/config.yaml"))


def test_report_is_one_self_contained_page(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    root, _differ = make_report_outputs(tmp_path)
    page = write_report(root, "exp")
    assert page == root / "reports" / "exp" / "index.html"
    text = page.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|<link\b|@import|url\(\s*["']?https?:""", text)
    assert text.count('src="data:image/png;base64,') == 1 and "<script src" not in text
    assert all(f'data-run="{name}"' in text for name in run_names(root)) and len(run_names(root)) == 7
    assert "not evaluated" in text and "failed" in text
    assert "table1_math_exp_qwen2.5-7b" in text and "table1_medical_exp_llama2-7b" in text and " ± " in text
    data = json.loads(re.search(r'<script type="application/json" id="sample-data">(.*?)</script>', text, re.S).group(1))
    assert sorted(g["benchmark"] for g in data) == sorted(MATH + MEDICAL)
    math500 = next(g for g in data if g["benchmark"] == "math500")
    assert math500["methods"] == ["Base", "10k SFT", "10k DFT", "10k ASFT"] and len(math500["items"]) == N_ITEMS
    first = math500["items"][0]
    assert first["q"] == "Question 0 of math500: what is 0 + 7?" and first["a"][3][1:] == ["x", True]
    mmlu = next(g for g in data if g["benchmark"] == "mmlu_medical")
    assert len(mmlu["items"]) == N_ITEMS and all(it["q"].startswith("Question") for it in mmlu["items"])
    offline = list((page.parent / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))  # the scores and the page went to wandb (offline)


def test_questions_only_from_the_file_that_was_scored(tmp_path):
    write_benchmarks(tmp_path)
    assert len(question_texts(tmp_path, "mmlu_medical", None)) == N_ITEMS
    assert question_texts(tmp_path, "medqa", {"medqa": "0" * 64}) == {}  # another file: ids shown instead
    assert question_texts(tmp_path / "missing", "medqa", None) == {}


def test_lambda_panel_only_for_a_varying_kl_coef(tmp_path):
    root, _differ = make_report_outputs(tmp_path, kl_schedule=True)
    assert [v for _s, v in _lambda_curve(root / "exp" / "asft")] == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.25])
    assert _lambda_curve(root / "exp" / "sft") == []


def test_report_cli_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit) as missing:
        main(["--root", str(tmp_path / "missing"), "--experiment", "exp", "--no-wandb"])
    assert str(missing.value.code).startswith("asft_repro.report: no directory") and "\n" not in str(missing.value.code)
    (tmp_path / "exp").mkdir()
    with pytest.raises(SystemExit, match="^asft_repro.report: no run with eval/.*; train with"):
        main(["--root", str(tmp_path), "--experiment", "exp", "--no-wandb"])
