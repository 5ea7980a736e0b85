"""Collect every run under outputs/ and render Table 1 (and ablation tables).

python -m asft_repro.tables [--root outputs] [--experiment demo] [--out outputs/tables]

Rows: data size x method (Base first); columns: per-benchmark scores, the domain averages,
the paper's published average and the difference. Missing cells stay empty (never 0);
several runs of one cell (seeds, repeats) are averaged and counted in ``n_runs``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from asft_repro.paper import PAPER_TABLE1_AVG
from asft_repro.rundir import read_record

METHOD_ORDER = ["base", "sft", "dft", "asft", "sft_kl"]


def collect_runs(root: Path, experiment: str | None = None) -> pd.DataFrame:
    """One row per run with eval/metrics.json: its keys, scores and provenance."""
    rows = []
    for metrics_path in sorted(root.glob("*/*/eval/metrics.json")):
        run_dir = metrics_path.parent.parent
        if experiment and run_dir.parent.name != experiment:
            continue
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        metrics = json.loads(metrics_path.read_text())
        record = read_record(run_dir)
        method = cfg["method"]["name"]
        row = {
            "experiment": run_dir.parent.name, "model": cfg["model"]["name"], "domain": cfg["data"]["domain"],
            "size": "-" if method == "base" else str(cfg["data"]["size"]), "method": method,
            "kl_coef": cfg["method"]["kl_coef"] if method in ("asft", "sft_kl") else None,
            "kl_direction": cfg["method"]["kl_direction"] if method in ("asft", "sft_kl") else None,
            "run_dir": str(run_dir), "data_sha256": record.get("data_manifest", {}).get("sha256"),
        }
        row.update({name: s["accuracy"] for name, s in metrics["benchmarks"].items()})
        row.update({k: v for k, v in metrics["averages"].items() if v is not None})
        rows.append(row)
    return pd.DataFrame(rows)


def _size_key(size: str) -> float:
    if size == "-":
        return -1
    return float(size.lower().replace("k", "e3").replace("m", "e6")) if size[0].isdigit() else 1e18


def table1(runs: pd.DataFrame, domain: str) -> pd.DataFrame:
    """Table 1 for one domain: mean over duplicate runs, paper average beside ours."""
    avg_col = "Math Avg" if domain == "math" else "Medical Avg"
    sub = runs[(runs["domain"] == domain)]
    if sub.empty:
        return pd.DataFrame()
    score_cols = [c for c in sub.columns if c not in {"experiment", "model", "domain", "size", "method", "kl_coef",
                  "kl_direction", "run_dir", "data_sha256", "Math Avg", "Medical Avg"} and sub[c].notna().any()]
    score_cols += [avg_col] if avg_col in sub else []
    grouped = sub.groupby(["size", "method"], sort=False)
    table = grouped[score_cols].mean()
    table["n_runs"] = grouped.size()
    table["run_dirs"] = grouped["run_dir"].agg(lambda d: ";".join(sorted(d)))
    table[f"paper {avg_col}"] = [PAPER_TABLE1_AVG.get(key, {}).get(avg_col) for key in table.index]
    if avg_col in table:
        table["diff vs paper"] = table[avg_col] - table[f"paper {avg_col}"]
    order = sorted(table.index, key=lambda k: (_size_key(k[0]), METHOD_ORDER.index(k[1]) if k[1] in METHOD_ORDER else 99))
    return table.loc[order]


def ablation(runs: pd.DataFrame, by: str) -> pd.DataFrame:
    """Scores of ASFT-family runs by one swept key (kl_direction or kl_coef)."""
    sub = runs[runs["kl_coef"].notna()]
    if sub.empty:
        return pd.DataFrame()
    cols = [c for c in ("Medical Avg", "Math Avg") if c in sub and sub[c].notna().any()]
    grouped = sub.groupby(["domain", "method", by])
    table = grouped[cols].mean()
    table["n_runs"] = grouped.size()
    return table


def write_tables(root: Path, out: Path, experiment: str | None = None) -> dict[str, pd.DataFrame]:
    runs = collect_runs(root, experiment)
    if runs.empty:
        raise SystemExit(f"asft_repro.tables: no run with eval/metrics.json under {root}"
                         + (f"/{experiment}" if experiment else "") + "; train with eval.after_train=true first")
    out.mkdir(parents=True, exist_ok=True)
    tables = {f"table1_{d}": table1(runs, d) for d in ("medical", "math")}
    tables.update({"ablation_kl_direction": ablation(runs, "kl_direction"), "ablation_lambda": ablation(runs, "kl_coef")})
    for name, table in tables.items():
        if table.empty:
            continue
        table.to_csv(out / f"{name}.csv")
        shown = table.drop(columns=[c for c in ("run_dirs",) if c in table])
        (out / f"{name}.tex").write_text(shown.to_latex(float_format="%.2f", na_rep="--"))
        print(f"\n## {name}\n\n{shown.to_markdown(floatfmt='.2f')}\n")
    runs.to_csv(out / "runs.csv", index=False)
    print(f"[tables] wrote CSV and LaTeX to {out} (every cell's run directories are in the CSV)")
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("outputs"))
    parser.add_argument("--experiment", default=None, help="only runs of this experiment_name")
    parser.add_argument("--out", type=Path, default=None, help="default: <root>/tables[/<experiment>]")
    args = parser.parse_args()
    out = args.out or args.root / "tables" / (args.experiment or "all")
    write_tables(args.root, out, args.experiment)


if __name__ == "__main__":
    main()
