"""Intervals, paired comparisons and significance marks for the tables, from the runs' per-sample records.

``annotate(tables, runs)`` reads each cell's records (asft_repro/records.py), and for every benchmark column and
the domain average, for ``acc`` (first sample) and ``mean_acc`` (each item's mean over its samples):

* scores: the value with its 95% bootstrap interval, analytic standard error, items and runs (asft_repro/stats.py);
* comparisons within each table, per size: ASFT vs DFT, ASFT vs SFT, DFT vs SFT, SFT+KL vs SFT, ASFT vs SFT+KL
  and every method vs Base (Table 1), each variant vs the paper's setting, λ=0.05 forward (ablations): the paired
  difference with its interval, sign-flip p-value, Holm-adjusted across the table's comparisons of one metric,
  and the minimum detectable effect. Items are paired by ``<benchmark>/<id>``; a pair whose item sets differ is
  refused with one line. Collapsed or unfinished cells are not compared.

Each table's frame gains ``<column> ci_low / ci_high / stderr / n_items / mark`` (``acc``, points) and ``paper in
CI``; its footnotes say what ± and † mean. Without records a table keeps its point estimates only.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from asft_repro import stats
from asft_repro.benchmarks import domain_benchmarks
from asft_repro.identity import KL_METHODS
from asft_repro.paper import is_paper_kl
from asft_repro.records import METRICS, item_scores, read_records

SCORE_FIELDS = ["experiment", "model", "domain", "size", "method", "kl_coef", "kl_direction", "variant", "eval_key",
                "benchmark", "metric", "value", "ci_low", "ci_high", "stderr", "n_items", "n_runs", "run_dirs",
                "data", "kl_schedule", "flag", "seeds_std"]
COMPARISON_FIELDS = ["experiment", "model", "domain", "size", "eval_key", "benchmark", "metric", "method_a", "method_b",
                     "delta", "ci_low", "ci_high", "p_value", "p_holm", "n_items", "mde", "discordance", "test", "table"]
TABLE1_PAIRS = [("asft", "dft"), ("asft", "sft"), ("dft", "sft"), ("sft_kl", "sft"), ("asft", "sft_kl")]
DAGGER = "†"
log = logging.getLogger(__name__)

Parts = dict[str, tuple[list[str], np.ndarray]]  # benchmark -> (item keys, (runs, items) scores)


class ResultTable(Protocol):
    """What this module reads and annotates of asft_repro.tables.ResultTable."""

    name: str
    frame: pd.DataFrame
    columns: list[tuple[str, str]]
    avg: str
    footnotes: list[str]


class CellRecords:
    """The item scores of one cell's runs, read once: benchmark -> metric -> (item keys, (runs, items) array)."""

    def __init__(self, eval_dirs: list[Path]):
        self.eval_dirs = eval_dirs
        self._parts: dict[str, dict[str, tuple[list[str], np.ndarray]] | None] = {}

    def benchmark(self, name: str) -> dict[str, tuple[list[str], np.ndarray]] | None:
        """metric -> (keys, scores) for ``name``; None without records, or when the runs scored different items."""
        if name not in self._parts:
            self._parts[name] = self._read(name)
        return self._parts[name]

    def _read(self, name: str) -> dict[str, tuple[list[str], np.ndarray]] | None:
        per_run = [read_records(d, name) for d in self.eval_dirs]
        if not per_run or not all(per_run):
            return None
        keys = sorted(per_run[0])
        if any(set(r) != set(keys) for r in per_run[1:]):
            runs = ";".join(str(d.parent.parent) for d in self.eval_dirs)
            log.warning("asft_repro.tables: the seeds of %s scored different %s items; no interval for it; "
                        "evaluate them on the same benchmark files", runs, name)
            return None
        return {m: (keys, np.array([[s[k] for k in keys] for s in (item_scores(r, m) for r in per_run)]))
                for m in METRICS}


def eval_dirs(cell: pd.Series, runs: pd.DataFrame) -> list[Path]:
    """The eval folders of a cell's runs (its run dirs, scored under its eval settings)."""
    dirs = set(str(cell["run_dirs"]).split(";"))
    rows = runs[runs["run_dir"].astype(str).isin(dirs) & (runs["eval_key"] == cell["eval_key"])]
    return [Path(r) / "eval" / str(h) for r, h in sorted(zip(rows["run_dir"].astype(str), rows["settings_hash"]))]


def column_parts(records: CellRecords, column: str, avg_members: list[str] | None, metric: str) -> Parts | None:
    """benchmark -> (keys, scores) that make up ``column`` (the domain's benchmarks for the average)."""
    names = avg_members if avg_members is not None else [column]
    parts = {}
    for name in names:
        got = records.benchmark(name)
        if got is None:
            return None
        parts[name] = got[metric]
    return parts


def _points(x: float) -> float:
    return 100.0 * x if x is not None and not math.isnan(x) else math.nan


def _cell_id(cell: pd.Series) -> str:
    keys = ["experiment", "model", "domain", "data", "size", "method", "kl_coef", "kl_direction", "kl_schedule", "variant",
            "eval_key", "flag", "run_dirs"]
    return json.dumps([str(cell.get(k)) for k in keys])


def method_name(label: str, cell: pd.Series) -> str:
    """The row label without its data and size: 'ASFT', 'DFT learning_rate=2e-05', 'Base'."""
    words = str(label).split()
    for prefix in (str(cell.get("data", "")), str(cell.get("size", ""))):
        if prefix and words and words[0] == prefix:
            words = words[1:]
    return " ".join(words)


def table_pairs(frame: pd.DataFrame, table1: bool) -> list[tuple[str, str, bool]]:
    """(row a, row b, marks a) of one table: what is compared with what, and which comparisons set a † on row a."""
    healthy = frame[frame["flag"] == ""]
    pairs: list[tuple[str, str, bool]] = []
    by_size: dict[str, pd.DataFrame] = {s: g for s, g in healthy.groupby("size", sort=False) if s != ""}
    if table1:
        bases = list(healthy.index[healthy["method"] == "base"])
        for rows in by_size.values():
            for a, b in TABLE1_PAIRS:
                pairs += [(ra, rb, b == "sft") for ra in rows.index[rows["method"] == a]
                          for rb in rows.index[rows["method"] == b]]
            pairs += [(ra, rb, False) for ra in rows.index[rows["method"] != "base"] for rb in bases]
        return pairs
    for rows in by_size.values():
        for _method, same in rows[rows["method"].isin(KL_METHODS)].groupby("method", sort=False):
            paper = [i for i, c in same.iterrows() if is_paper_kl(c["kl_coef"], c["kl_direction"]) and not c.get("kl_schedule")]
            for i, c in same.iterrows():
                if i in paper:
                    continue
                pairs += [(i, ref, True) for ref in paper]
                if c["kl_direction"] == "reverse":  # and against the forward KL of its own λ
                    pairs += [(i, j, False) for j, o in same.iterrows() if j not in paper and o["kl_direction"] == "forward"
                              and abs(o["kl_coef"] - c["kl_coef"]) < 1e-12]
    return pairs


def _paired(a: Parts, b: Parts) -> tuple[list[np.ndarray], list[np.ndarray]] | str:
    """The two sides' scores on the same items in the same order, or why they cannot be paired."""
    a_side, b_side = [], []
    for name in a:
        keys_a, keys_b = a[name][0], b[name][0]
        if set(keys_a) != set(keys_b):
            only_a, only_b = len(set(keys_a) - set(keys_b)), len(set(keys_b) - set(keys_a))
            return f"item sets differ on {name} ({only_a} only in the first, {only_b} only in the second)"
        order = {k: i for i, k in enumerate(keys_b)}
        a_side.append(a[name][1])
        b_side.append(b[name][1][:, [order[k] for k in keys_a]])
    return a_side, b_side


def annotate(tables: dict[str, ResultTable], runs: pd.DataFrame,
             alpha: float = stats.ALPHA) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Intervals, comparisons, † marks and paper-in-interval for every table (in place); returns (scores, comparisons)."""
    cells: dict[str, CellRecords] = {}
    intervals: dict[tuple[str, str, str], stats.Interval | None] = {}
    scores: dict[tuple[str, str, str], dict[str, Any]] = {}
    comparisons: list[dict[str, Any]] = []
    for name, table in tables.items():
        frame = table.frame
        domain = str(frame["domain"].iloc[0])
        members = {table.avg: domain_benchmarks(domain)}
        parts_of: dict[tuple[str, str, str], Parts | None] = {}
        for label, cell in frame.iterrows():
            records = cells.setdefault(_cell_id(cell), CellRecords(eval_dirs(cell, runs)))
            for column, _shown in table.columns:
                for metric in METRICS:
                    parts = column_parts(records, column, members.get(column), metric)
                    parts_of[(label, column, metric)] = parts
                    key = (_cell_id(cell), column, metric)
                    if key not in intervals:
                        intervals[key] = stats.score_interval([p[1] for p in parts.values()]) if parts else None
                    iv = intervals[key]
                    if iv is not None and key not in scores:
                        scores[key] = _score_row(cell, column, metric, iv)
                    if metric == "acc":
                        _set_interval(frame, label, column, iv)
        found = _compare(name, table, parts_of, alpha)
        comparisons += found
        _mark(table, found, alpha)
    score_frame = pd.DataFrame(list(scores.values()), columns=SCORE_FIELDS)
    return score_frame, pd.DataFrame(comparisons, columns=COMPARISON_FIELDS)


def _score_row(cell: pd.Series, column: str, metric: str, iv: stats.Interval) -> dict[str, Any]:
    row = {k: cell.get(k) for k in SCORE_FIELDS if k in cell.index}
    row.update(benchmark=column, metric=metric, value=_points(iv.value), ci_low=_points(iv.low), ci_high=_points(iv.high),
               stderr=_points(iv.stderr), n_items=iv.n_items, n_runs=iv.n_runs, seeds_std=_points(iv.seeds_std))
    return row


def _set_interval(frame: pd.DataFrame, label: Any, column: str, iv: stats.Interval | None) -> None:
    for suffix in ("ci_low", "ci_high", "stderr", "n_items"):
        if f"{column} {suffix}" not in frame:
            frame[f"{column} {suffix}"] = math.nan
    if f"{column} mark" not in frame:
        frame[f"{column} mark"] = ""
    if iv is None:
        return
    reported = frame.at[label, column]
    if reported is not None and not pd.isna(reported) and abs(float(reported) - _points(iv.value)) > 1e-6:
        log.warning("asft_repro.tables: %s %s: metrics.json says %.4f, its records %.4f; the interval is the records'",
                    label, column, float(reported), _points(iv.value))
    frame.loc[label, [f"{column} ci_low", f"{column} ci_high", f"{column} stderr", f"{column} n_items"]] = \
        [_points(iv.low), _points(iv.high), _points(iv.stderr), iv.n_items]


def _compare(name: str, table: ResultTable, parts_of: dict[tuple[Any, str, str], Parts | None],
             alpha: float) -> list[dict[str, Any]]:
    """Every comparison of one table, Holm-adjusted per metric across the table."""
    frame = table.frame
    rows: list[dict[str, Any]] = []
    for a, b, marks in table_pairs(frame, name.startswith("table1")):
        ca, cb = frame.loc[a], frame.loc[b]
        for column, _shown in table.columns:
            for metric in METRICS:
                pa, pb = parts_of.get((a, column, metric)), parts_of.get((b, column, metric))
                if not pa or not pb:
                    continue
                paired = _paired(pa, pb)
                if isinstance(paired, str):
                    if metric == METRICS[0]:
                        log.warning("asft_repro.tables: %s: %s vs %s on %s not compared: %s; evaluate both on the same "
                                    "benchmark files", name, a, b, column, paired)
                    continue
                c = stats.paired_comparison(*paired)
                rows.append({"experiment": ca["experiment"], "model": ca["model"], "domain": ca["domain"],
                             "size": ca["size"] or cb["size"], "eval_key": ca["eval_key"], "benchmark": column,
                             "metric": metric, "method_a": method_name(a, ca), "method_b": method_name(b, cb),
                             "delta": _points(c.delta), "ci_low": _points(c.low), "ci_high": _points(c.high),
                             "p_value": c.p_value, "n_items": c.n_items, "mde": _points(c.mde),
                             "discordance": c.discordance, "test": c.test, "table": name,
                             "_rows": (a, b, marks)})
    for metric in METRICS:
        family = [r for r in rows if r["metric"] == metric]
        for r, p in zip(family, stats.holm([r["p_value"] for r in family])):
            r["p_holm"] = p
    return rows


def _mark(table: ResultTable, found: list[dict[str, Any]], alpha: float) -> None:
    """† on row a's cell where a marking comparison is significant (acc); footnotes for ±, †, MDE, paper-in-CI."""
    frame, table1 = table.frame, table.name.startswith("table1")
    acc = [r for r in found if r["metric"] == "acc"]
    marked = []
    for r in acc:
        a, _b, marks = r.pop("_rows")
        if marks and r["p_holm"] < alpha:
            frame.at[a, f"{r['benchmark']} mark"] = DAGGER
            marked.append(f"{a} on {r['benchmark']}")
    for r in found:
        r.pop("_rows", None)
    avg = table.avg
    if not any(f"{c} ci_low" in frame and frame[f"{c} ci_low"].notna().any() for c, _ in table.columns):
        return  # no records: point estimates only, nothing more to say
    paper = frame.get(f"paper {avg}")
    if paper is not None:
        frame["paper in CI"] = [("yes" if lo <= p <= hi else "no") if not (pd.isna(p) or pd.isna(lo)) else ""
                                for p, lo, hi in zip(paper, frame[f"{avg} ci_low"], frame[f"{avg} ci_high"])]
    reference = "SFT of the same size" if table1 else "the paper's setting (λ=0.05 forward) of the same size and method"
    n_tests = len(acc)
    table.footnotes += [
        f"± = half-width of the 95% percentile bootstrap interval over items ({stats.N_RESAMPLES:,} resamples, seed "
        f"{stats.SEED}; items resampled within each benchmark for {avg}; seeds resampled too where n_runs > 1); "
        "(sd) = std over seeds; scores.csv holds each interval's ends (asymmetric near 0 and 100), its standard error "
        "and mean_acc.",
        f"{DAGGER} = differs from {reference} at p < {alpha:g} after Holm across this table's {n_tests} paired comparisons "
        "(sign-flip permutation test over items, exact McNemar for 0/1 scores; comparisons.csv): "
        + (", ".join(marked) if marked else "no difference is significant") + ".",
        "paper in CI: whether the paper's published number lies inside our 95% interval of the same cell.",
    ]
    mdes = _median_mde(acc, [c for c, _ in table.columns])
    if mdes:
        table.footnotes.append("smallest paired difference these items can detect (80% power, two-sided 5%, at the "
                               "observed discordance; never below 100·z²/n points, z = 2.80, as an effect needs "
                               "discordant items of its own; median over this table's comparisons): "
                               + ", ".join(f"{label} {mdes[c]:.1f}" for c, label in table.columns if c in mdes) + " points.")
    flat = [int(n) for c, _ in table.columns if f"{c} n_items" in frame
            for n, lo, hi in zip(frame[f"{c} n_items"], frame[f"{c} ci_low"], frame[f"{c} ci_high"])
            if not pd.isna(lo) and lo == hi and c != avg]
    if flat:
        n = min(flat)
        table.footnotes.append(f"± 0.00: every item scored alike (all wrong or all right), where resampling items cannot "
                               f"vary the score; the exact 95% bound for 0 of {n} right is "
                               f"{100 * (1 - (alpha / 2) ** (1 / n)):.1f} points (Clopper-Pearson).")


def _median_mde(rows: Iterable[dict[str, Any]], columns: list[str]) -> dict[str, float]:
    by_column: dict[str, list[float]] = {}
    for r in rows:
        by_column.setdefault(r["benchmark"], []).append(r["mde"])
    return {c: float(np.median(by_column[c])) for c in columns if c in by_column}
