"""Collect every evaluated run under outputs/ and render Table 1 and the ablation tables.

python -m asft_repro.tables [--root outputs] [--experiment demo] [--out outputs/tables/demo] [--no-wandb]

A cell is one (experiment, model, domain, data, size, method, λ, KL direction, other training values,
eval settings) and a health flag (collapsed / unfinished runs get their own, labelled row); its seeds
are averaged (mean ± std, ``n_runs``), nothing else ever is. Eval settings are compared without the
scored model's fingerprint (which every run's settings hash includes). One Table 1 per (experiment,
model, domain [, eval settings]) holds Base / SFT / DFT and the paper's λ=0.05 forward ASFT (and SFT+KL); λ and KL-direction
ablation tables (and a λ-schedule one) appear only when such runs exist. Each table is printed and saved as Markdown, CSV
(with every cell's run directories and config hashes) and LaTeX, and logged to wandb (offline).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from asft_repro.cli import OneLineParser, cli_error, setup_logging
from asft_repro.files import short_hash
from asft_repro.identity import KL_METHODS, flatten, training_identity
from asft_repro.intervals import annotate
from asft_repro.kl_schedule import schedule_label
from asft_repro.benchmarks import benchmark_label, domain_benchmarks, domains
from asft_repro.rundir import FINAL_DIR, final_problem
from asft_repro.paper import AVG_COLUMN, PAPER_KL_COEF, PAPER_MODELS, is_paper_kl, paper_average

log = logging.getLogger(__name__)

# domain -> [(benchmark, label)] in the paper's column order (conf/prep/sources.yaml)
BENCHMARKS: dict[str, list[tuple[str, str]]] = {d: [(b, benchmark_label(b)) for b in domain_benchmarks(d)] for d in domains()}
METHOD_ORDER = ["base", "sft", "dft", "asft", "sft_kl"]
METHOD_LABEL = {"base": "Base", "sft": "SFT", "dft": "DFT", "asft": "ASFT", "sft_kl": "SFT+KL"}
CELL_KEY = ["experiment", "model", "domain", "data", "size", "method", "kl_coef", "kl_direction", "kl_schedule", "variant",
            "eval_key", "flag"]
DASH = "-"
_META = {"seed", "wandb_project", "collapse_reason", "run_dir", "config_hash", "data_sha256", "variant_identity",
         "settings_hash", "eval_settings"}
MODEL_SETTINGS = ("model", "server_model")  # which model was scored: differs per run by design, not a setting


fail = functools.partial(cli_error, "asft_repro.tables")  # fail(what, fix): the one-line CLI error


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file, or None (with a note on stderr) when it is unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("skipping unreadable %s: %s", path, err)
        return None


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's resolved config.yaml, or None when it has none."""
    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def run_identity(cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """What a run is, from its config (never its directory name); λ and direction only for KL methods."""
    method = cfg["method"]["name"]
    kl, base = method in KL_METHODS, method == "base"
    return {
        "experiment": str(cfg.get("experiment_name") or run_dir.parent.name),
        "model": str(cfg["model"]["name"]), "domain": str(cfg["data"]["domain"]),
        "data": "" if base else str(cfg["data"]["name"]), "size": "" if base else str(cfg["data"]["size"]),
        "method": method, "kl_coef": float(cfg["method"]["kl_coef"]) if kl else math.nan,
        "kl_direction": str(cfg["method"]["kl_direction"]) if kl else "",
        "kl_schedule": schedule_label(cfg["method"]) if kl else "",  # '' = constant λ (asft_repro/kl_schedule.py)
        "seed": cfg.get("train", {}).get("seed"), "wandb_project": cfg.get("wandb", {}).get("project"),
    }


def run_variant(record: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """The training identity without the seed: runs sharing it are seeds of one cell.

    Recomputed from config.yaml by one function for every run (so runs compare alike); run.json's copy otherwise.
    """
    try:
        identity = training_identity(cfg)
    except (KeyError, TypeError, ValueError):
        identity = record.get("identity") if isinstance(record.get("identity"), dict) else {}
    variant = {k: v for k, v in identity.items() if k != "train.seed"}
    if variant.get("method.name") != "base":  # the identity leaves the default out; a table beside cached-anchor
        variant.setdefault("method.anchor", "exact")  # runs then reads "anchor=exact", not "anchor=-"
    return variant


def final_flag(run_dir: Path, record: dict[str, Any]) -> str:
    """'final/ damaged' when the run's final/ weight files no longer have the sizes run.json recorded (logged)."""
    problem = final_problem(run_dir / FINAL_DIR, record, hashes=False)
    if problem:
        log.warning("%s: %s; re-save it with train.resume=true train.redo_final=true", run_dir, problem)
    return "final/ damaged" if problem else ""


def run_flag(record: dict[str, Any]) -> str:
    """'collapsed', 'unfinished' or '' (healthy) from run.json."""
    if record.get("collapsed"):
        return "collapsed"
    return "unfinished" if record.get("train_status", "complete") != "complete" else ""


def eval_key(settings: dict[str, Any], settings_hash: str) -> dict[str, str]:
    """The eval settings minus the scored model's fingerprint (12-hex key + JSON); runs sharing it compare alike."""
    shared = {k: v for k, v in settings.items() if k not in MODEL_SETTINGS}
    if not shared:
        return {"eval_key": settings_hash, "eval_settings": "{}"}
    text = json.dumps(shared, sort_keys=True, default=str)
    return {"eval_key": short_hash(shared), "eval_settings": text}


def settings_differences(settings: dict[str, str]) -> dict[str, str]:
    """eval_key -> 'temperature=0.6 n_samples=4': the settings that tell the tables of one group apart."""
    flat = {key: flatten(json.loads(text)) for key, text in settings.items()}
    keys = sorted(k for k in set().union(*flat.values()) if len({json.dumps(f.get(k), default=str) for f in flat.values()}) > 1)
    return {key: " ".join(f"{k}={f.get(k, DASH)}" for k in keys if not k.startswith("benchmarks.")) or "benchmark files differ"
            for key, f in flat.items()}


def run_rows(run_dir: Path) -> list[dict[str, Any]]:
    """One row per eval settings folder of a run: identity, provenance, scores."""
    cfg = read_config(run_dir)
    if cfg is None:
        log.warning("skipping %s: no config.yaml", run_dir)
        return []
    record = _read_json(run_dir / "run.json") or {}
    variant_identity = run_variant(record, cfg)
    variant = json.dumps(variant_identity, sort_keys=True, default=str)
    ident = {**run_identity(cfg, run_dir), "flag": run_flag(record) or final_flag(run_dir, record), "collapse_reason": record.get("collapse_reason", ""),
             "run_dir": str(run_dir), "config_hash": str(record.get("config_hash", "")),
             "data_sha256": (record.get("data_manifest") or {}).get("sha256"),
             "variant": short_hash(variant_identity), "variant_identity": variant}
    rows = []
    for path in sorted(run_dir.glob("eval/*/metrics.json")):
        metrics = _read_json(path)
        if metrics is None:
            continue
        settings_hash = str(metrics.get("settings_hash") or path.parent.name)
        row = {**ident, "settings_hash": settings_hash, **eval_key(metrics.get("settings") or {}, settings_hash)}
        row.update({name: b.get("accuracy") for name, b in (metrics.get("benchmarks") or {}).items()})
        row.update({k: v for k, v in (metrics.get("averages") or {}).items() if v is not None})
        rows.append(row)
    return rows


def collect_runs(root: Path, experiment: str | None = None) -> pd.DataFrame:
    """One row per (run, eval settings) with eval/<settings_hash>/metrics.json under ``root``."""
    run_dirs = sorted({p.parent.parent.parent for p in root.glob("*/*/eval/*/metrics.json")})
    rows = [row for d in run_dirs for row in run_rows(d)]
    runs = pd.DataFrame(rows)
    if experiment is not None and not runs.empty:
        runs = runs[runs["experiment"] == experiment].reset_index(drop=True)
    return runs


def score_columns(runs: pd.DataFrame, domain: str) -> list[tuple[str, str]]:
    """(column, label) in the paper's order, then any other benchmark the runs have, then the average."""
    known = {c for cols in BENCHMARKS.values() for c, _ in cols} | set(AVG_COLUMN.values())
    extra = sorted(c for c in runs.columns if c not in known and c not in CELL_KEY and c not in _META
                   and runs[c].notna().any())
    avg = AVG_COLUMN[domain]
    return [*BENCHMARKS[domain], *((c, c) for c in extra), (avg, avg)]


def aggregate(runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """One row per cell: mean and std over its seeds, n_runs, run dirs, config hashes, collapse notes."""
    runs = runs.assign(**{c: pd.to_numeric(runs[c], errors="coerce") if c in runs else math.nan for c in columns})
    cells = runs.groupby(CELL_KEY, dropna=False, sort=False)
    table = cells[columns].mean()
    std = cells[columns].std(ddof=1)
    for c in columns:
        table[f"{c} std"] = std[c]
    table["n_runs"] = cells.size().astype(int)
    table["run_dirs"] = cells["run_dir"].agg(lambda d: ";".join(sorted(d)))
    table["config_hashes"] = cells["config_hash"].agg(lambda h: ";".join(sorted(set(h) - {""})))
    table["seeds"] = cells["seed"].agg(lambda s: ";".join(str(x) for x in sorted(s, key=str)))
    table["variant_identity"] = cells["variant_identity"].first()
    table["settings_hashes"] = cells["settings_hash"].agg(lambda h: ";".join(sorted(h)))
    table["eval_settings"] = cells["eval_settings"].first()
    table["collapse_reasons"] = cells["collapse_reason"].agg(lambda r: "; ".join(sorted(set(map(str, r)) - {""})))
    return table.reset_index()


def _size_key(size: str) -> float:
    """'10k' -> 1e4, '64' -> 64; unknown sizes last."""
    try:
        return float(size.lower().replace("k", "e3").replace("m", "e6"))
    except ValueError:
        return math.inf


def _order(cells: pd.DataFrame) -> pd.DataFrame:
    """Base first, then by size, method (paper order), λ, direction, healthy before flagged."""
    key = cells.apply(lambda r: (r["method"] != "base", r["data"], _size_key(r["size"]),
                                 METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else 99,
                                 -1.0 if pd.isna(r["kl_coef"]) else r["kl_coef"], r["kl_direction"], r["kl_schedule"],
                                 r["flag"]), axis=1)
    return cells.loc[sorted(cells.index, key=lambda i: key[i])]


def row_label(cell: pd.Series, show_kl: bool, show_data: bool, extra: str = "") -> str:
    """'Base', '10k SFT', '10k ASFT λ=0.1 reverse', '10k DFT learning_rate=2e-05', '30k DFT (collapsed)'."""
    parts = [] if cell["method"] == "base" else [cell["data"]] if show_data else []
    parts += ["Base"] if cell["method"] == "base" else [cell["size"], METHOD_LABEL.get(cell["method"], cell["method"])]
    if show_kl and cell["method"] in KL_METHODS:
        parts += [f"λ={cell['kl_coef']:g}", cell["kl_direction"]] + ([cell["kl_schedule"]] if cell["kl_schedule"] else [])
    parts += [extra] if extra else []
    if cell["flag"]:
        parts.append(f"({cell['flag']})")
    return " ".join(parts)


@dataclass
class ResultTable:
    """One rendered table: numeric frame (index = row labels) plus how to show it."""

    name: str
    title: str
    experiment: str
    frame: pd.DataFrame
    columns: list[tuple[str, str]]  # (frame column, display label)
    avg: str
    footnotes: list[str] = field(default_factory=list)

    def display(self) -> pd.DataFrame:
        """Strings as pasted: 'score ± 95% half-width', '†', '(sd)' over seeds (asft_repro/intervals.py), a dash if missing."""
        f, nan = self.frame, pd.Series(math.nan, index=self.frame.index)
        shown = {label: [fmt_score(m, s, n, (hi - lo) / 2, mark) for m, s, n, lo, hi, mark in
                         zip(f[c], f[f"{c} std"], f["n_runs"], f.get(f"{c} ci_low", nan), f.get(f"{c} ci_high", nan),
                             f.get(f"{c} mark", pd.Series("", index=f.index)))] for c, label in self.columns}
        shown[f"paper {self.avg}"] = [fmt_num(v) for v in f[f"paper {self.avg}"]]
        shown["diff vs paper"] = [fmt_num(v, signed=True) for v in f["diff vs paper"]]
        if "paper in CI" in f:
            shown["paper in 95% CI"] = [v or DASH for v in f["paper in CI"]]
        shown["n_runs"] = [str(int(n)) for n in f["n_runs"]]
        return pd.DataFrame(shown, index=f.index)

    def markdown(self) -> str:
        """A GitHub pipe table with its title and footnotes."""
        d = self.display()
        lines = [f"## {self.name}", "", self.title, "", _pipe_row([d.index.name or "", *d.columns]),
                 _pipe_row(["---", *(["---:"] * len(d.columns))])]
        lines += [_pipe_row([label, *row]) for label, row in zip(d.index, d.values.tolist())]
        return "\n".join([*lines, "", *(f"{i}. {note}" for i, note in enumerate(self.footnotes, 1))]).rstrip() + "\n"

    def latex(self) -> str:
        """A booktabs tabular with a caption comment and footnotes."""
        d = self.display()
        head = " & ".join(_tex(c) for c in [d.index.name or "", *d.columns])
        body = [" & ".join(_tex(c) for c in [label, *row]) + r" \\" for label, row in zip(d.index, d.values.tolist())]
        notes = [f"% {_tex(n)}" for n in self.footnotes]
        return "\n".join([f"% {_tex(self.title)}", r"\begin{tabular}{l" + "r" * len(d.columns) + "}", r"\toprule",
                          head + r" \\", r"\midrule", *body, r"\bottomrule", r"\end{tabular}", *notes]) + "\n"

    def csv_frame(self) -> pd.DataFrame:
        """Every number and the provenance of each cell (run dirs, config hashes)."""
        return self.frame.rename_axis("row").reset_index()


def fmt_num(value: Any, signed: bool = False) -> str:
    """2 decimals, or a dash when missing."""
    if value is None or pd.isna(value):
        return DASH
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def fmt_score(mean: Any, std: Any, n: int, half: float = math.nan, mark: str = "") -> str:
    """'12.34 ± 3.10† (sd 0.56)': the score, its 95% half-width when known, a mark, the std over several seeds."""
    if mean is None or pd.isna(mean):
        return DASH
    text = f"{mean:.2f}" + (f" ± {half:.2f}" if not pd.isna(half) else "") + (mark or "")
    return text + (f" (sd {std:.2f})" if n > 1 and not pd.isna(std) else "")


def _pipe_row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
        "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "λ": r"$\lambda$", "|": r"$\|$",
        "†": r"$^\dagger$"}


def _tex(text: Any) -> str:
    out = "".join(_TEX.get(ch, ch) for ch in str(text))
    return "--" if out == DASH else out


def variant_labels(cells: pd.DataFrame, labels: list[str]) -> dict[Any, str]:
    """For cells sharing a label but trained differently (lr, batch, ...): 'learning_rate=2e-05' naming what differs."""
    extras: dict[Any, str] = {i: "" for i in cells.index}
    for label in set(labels):
        same = [i for i, lab in zip(cells.index, labels) if lab == label]
        idents = {i: json.loads(cells.loc[i, "variant_identity"]) for i in same}
        if len({cells.loc[i, "variant"] for i in same}) < 2:
            continue
        keys = sorted(k for k in set().union(*idents.values())
                      if len({json.dumps(d.get(k), default=str) for d in idents.values()}) > 1)
        for i in same:
            extras[i] = " ".join(f"{k.rsplit('.', 1)[-1]}={idents[i].get(k, DASH)}" for k in keys)
    return extras


def build_table(name: str, cells: pd.DataFrame, group: dict[str, str], columns: list[tuple[str, str]],
                show_kl: bool) -> ResultTable:
    """Order and label the cells of one table, add the paper's average where a paper cell matches."""
    domain, avg = group["domain"], AVG_COLUMN[group["domain"]]
    cells = _order(cells).copy()
    show_data = cells.loc[cells["data"] != "", "data"].nunique() > 1
    extras = variant_labels(cells, [row_label(c, show_kl, show_data) for _, c in cells.assign(flag="").iterrows()])
    cells.index = pd.Index([row_label(c, show_kl, show_data, extras[i]) for i, c in cells.iterrows()], name="Method")
    cells[f"paper {avg}"] = [paper_average(c["model"], domain, c["size"], c["method"], c["kl_coef"], c["kl_direction"])
                             for _, c in cells.iterrows()]
    cells[f"paper {avg}"] = pd.to_numeric(cells[f"paper {avg}"], errors="coerce").where((cells["kl_schedule"] == "").to_numpy())
    cells["diff vs paper"] = cells[avg] - cells[f"paper {avg}"]
    title = (f"{group['kind']}: experiment {group['experiment']}, model {group['model']}, {domain}"
             + f", eval settings {group['eval_key']}{group['eval_note']}"
             + f"; score ± half-width of its 95% interval, (sd) over seeds (n_runs); '{DASH}' = missing.")
    return ResultTable(name, title, group["experiment"], cells, columns, avg, footnotes(cells, domain))


def footnotes(cells: pd.DataFrame, domain: str) -> list[str]:
    """Which paper cells are compared, and every collapsed or unfinished run by directory."""
    notes = [f"paper: the published {AVG_COLUMN[domain]} of the same cell (model {PAPER_MODELS[domain]}, same size "
             f"and method, ASFT at λ=0.05 forward); '{DASH}' where no paper cell matches."]
    for label, c in cells[cells["flag"] != ""].iterrows():
        reason = f": {c['collapse_reasons']}" if c["collapse_reasons"] else ""
        notes.append(f"{label}: {c['flag']} run(s){reason}; {c['run_dirs']}")
    return notes


def _slug(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", text)


def is_table1_cell(cells: pd.DataFrame) -> pd.Series:
    """Base, SFT, DFT, and KL methods only at the paper's constant λ=0.05 forward."""
    kl = cells["method"].isin(KL_METHODS)
    default = [is_paper_kl(c, d) and not s for c, d, s in zip(cells["kl_coef"], cells["kl_direction"], cells["kl_schedule"])]
    return ~kl | pd.Series(default, index=cells.index)


def ablation_parts(cells: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """λ ablation (forward KL runs) when a λ other than 0.05 exists; direction ablation when a reverse run exists;
    λ-schedule ablation (scheduled runs beside the constant runs of their start λ and direction) when one exists."""
    every_kl = cells[cells["method"].isin(KL_METHODS)]
    kl = every_kl[every_kl["kl_schedule"] == ""]  # constant λ
    scheduled = every_kl[every_kl["kl_schedule"] != ""]
    forward = kl[kl["kl_direction"] == "forward"]
    parts = {}
    if (abs(forward["kl_coef"] - PAPER_KL_COEF) > 1e-12).any():
        parts["ablation_lambda"] = forward
    reverse = kl[kl["kl_direction"] == "reverse"]
    if not reverse.empty:
        parts["ablation_kl_direction"] = kl[kl["kl_coef"].isin(set(reverse["kl_coef"]))]
    if not scheduled.empty:
        starts = set(zip(scheduled["kl_coef"], scheduled["kl_direction"]))
        parts["ablation_lambda_schedule"] = every_kl[[(c, d) in starts for c, d in zip(every_kl["kl_coef"], every_kl["kl_direction"])]]
    return parts


def make_tables(runs: pd.DataFrame) -> dict[str, ResultTable]:
    """Table 1 and ablations per (experiment, model, domain [, eval settings])."""
    tables: dict[str, ResultTable] = {}
    for (exp, model, domain), sub in runs.groupby(["experiment", "model", "domain"], sort=True):
        columns = score_columns(sub, domain)
        cells = aggregate(sub, [c for c, _ in columns])
        keys = sorted(cells["eval_key"].unique())
        notes = settings_differences(dict(zip(cells["eval_key"], cells["eval_settings"]))) if len(keys) > 1 else {}
        for key in keys:
            part = cells[cells["eval_key"] == key]
            group = {"experiment": exp, "model": model, "domain": domain, "eval_key": key,
                     "eval_note": f" ({notes[key]})" if key in notes else ""}
            stem = _slug(f"{domain}_{exp}_{model}" + (f"_{key}" if len(keys) > 1 else ""))
            candidates = {"table1": part[is_table1_cell(part)], **ablation_parts(part)}
            for kind, rows in candidates.items():
                if not rows.empty:
                    tables[f"{kind}_{stem}"] = build_table(f"{kind}_{stem}", rows, {**group, "kind": _KIND[kind]},
                                                           columns, show_kl=kind != "table1")
    return tables


_KIND = {"table1": "Table 1", "ablation_lambda": "λ ablation", "ablation_kl_direction": "KL-direction ablation",
         "ablation_lambda_schedule": "λ-schedule ablation"}


def save_table(table: ResultTable, out: Path) -> None:
    """<name>.md, <name>.csv, <name>.tex under ``out``."""
    (out / f"{table.name}.md").write_text(table.markdown())
    table.csv_frame().to_csv(out / f"{table.name}.csv", index=False)
    (out / f"{table.name}.tex").write_text(table.latex())


def log_wandb(tables: dict[str, ResultTable], runs: pd.DataFrame, out: Path) -> list[Path]:
    """One wandb run per experiment, ``<experiment>-tables``, each table a wandb.Table; offline by default."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    dirs = []
    for exp in sorted({t.experiment for t in tables.values()}):
        projects = runs.loc[runs["experiment"] == exp, "wandb_project"].dropna()
        run = wandb.init(project=projects.iloc[0] if len(projects) else "asft-repro", name=f"{exp}-tables", group=exp,
                         job_type="tables", dir=str(out), reinit="finish_previous")
        run.log({t.name: _wandb_table(t) for t in tables.values() if t.experiment == exp})
        dirs.append(Path(run.dir).parent)
        run.finish()
    return dirs


def _wandb_table(table: ResultTable) -> Any:
    import wandb

    frame = table.csv_frame().astype(object)
    frame = frame.where(frame.notna(), None)
    return wandb.Table(dataframe=frame)


def write_tables(root: Path, out: Path, experiment: str | None = None, use_wandb: bool = True) -> dict[str, ResultTable]:
    """Collect, render, print and save every table; raise SystemExit with one line when there is nothing."""
    if not root.is_dir():
        raise fail(f"no directory {root}", "pass --root <the folder holding <experiment>/<run>/ dirs>")
    runs = collect_runs(root, experiment)
    if runs.empty:
        where = f"{root}/{experiment}" if experiment else str(root)
        raise fail(f"no run with eval/<settings>/metrics.json under {where}",
                   "train with eval.after_train=true (or run python -m eval.run) first")
    tables = make_tables(runs)
    scores, comparisons = annotate(tables, runs)  # intervals, paired comparisons, † marks (asft_repro/intervals.py)
    out.mkdir(parents=True, exist_ok=True)
    for table in tables.values():
        save_table(table, out)
        print("\n" + table.markdown())
    runs.to_csv(out / "runs.csv", index=False)
    scores.to_csv(out / "scores.csv", index=False)
    comparisons.to_csv(out / "comparisons.csv", index=False)
    if use_wandb:
        log_wandb(tables, runs, out)
    log.info("wrote Markdown, CSV and LaTeX to %s (every cell's run directories are in the CSV)", out)
    return tables


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    parser = OneLineParser(prog="asft_repro.tables", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("outputs"))
    parser.add_argument("--experiment", default=None, help="only runs of this experiment_name")
    parser.add_argument("--out", type=Path, default=None, help="default: <root>/tables/<experiment or all>")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the tables to wandb")
    args = parser.parse_args(argv)
    out = args.out or args.root / "tables" / (args.experiment or "all")
    write_tables(args.root, out, args.experiment, use_wandb=not args.no_wandb)


if __name__ == "__main__":
    main()
