"""KL-drift, DFT-weight ESS and loss curves (and λ, when a schedule moves it) from every run's metrics.jsonl (no wandb needed).

python -m asft_repro.plots [--root outputs] [--experiment demo] [--out outputs/plots]

Runs are identified by their config.yaml, never their directory name: one figure per (experiment,
model, data, size), one line per run labelled by method (+ λ / KL direction when not the paper's, + "cached anchor k=K"
for method.anchor=cache, + the λ schedule when not constant, + seed when a method has several, + "(collapsed)").
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from asft_repro.cli import OneLineParser, cli_error, setup_logging
from asft_repro.jsonl import JsonlError, read_jsonl  # noqa: E402
from asft_repro.paper import is_paper_kl  # noqa: E402
from asft_repro.rundir import read_record  # noqa: E402
from asft_repro.tables import KL_METHODS, METHOD_LABEL, METHOD_ORDER, read_config, run_identity  # noqa: E402

log = logging.getLogger(__name__)

PANELS = [("kl_forward", "KL(base || policy)"), ("dft_weight_ess", "ESS of DFT weights"), ("ce", "cross-entropy"), ("loss", "training loss")]
LAMBDA_PANEL = ("kl_coef", "λ (kl_coef)")  # drawn when some run's λ varies (method.kl_schedule, asft_repro/kl_schedule.py)


fail = functools.partial(cli_error, "asft_repro.plots")  # fail(what, fix): the one-line CLI error


@dataclass
class PlotRun:
    """One run to draw: its identity (from config.yaml) and directory."""

    run_dir: Path
    ident: dict
    collapsed: bool
    anchor: str = ""  # "cached anchor k=128" for method.anchor=cache; "" for the resident base

    @property
    def figure_key(self) -> tuple[str, str, str, str]:
        i = self.ident
        return i["experiment"], i["model"], i["data"], i["size"]

    def label(self, with_seed: bool) -> str:
        """'ASFT', 'ASFT λ=0.1 reverse', 'DFT s1 (collapsed)'."""
        i = self.ident
        parts = [METHOD_LABEL.get(i["method"], i["method"])]
        if i["method"] in KL_METHODS and not is_paper_kl(i["kl_coef"], i["kl_direction"]):
            parts += [f"λ={i['kl_coef']:g}", i["kl_direction"]]
        if i.get("kl_schedule"):
            parts.append(i["kl_schedule"])
        if self.anchor:
            parts.append(self.anchor)
        if with_seed:
            parts.append(f"s{i['seed']}")
        return " ".join(parts + (["(collapsed)"] if self.collapsed else []))


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)]; a torn last line is skipped, a re-logged step keeps its last value."""
    by_step: dict[str, dict[int, float]] = {}
    for row in read_jsonl(run_dir / "metrics.jsonl", repair=False):
        for key, _title in [*PANELS, LAMBDA_PANEL]:
            if isinstance(row.get(key), (int, float)) and "step" in row:
                by_step.setdefault(key, {})[int(row["step"])] = float(row[key])
    return {k: sorted(v.items()) for k, v in by_step.items()}


def find_runs(root: Path, experiment: str | None = None) -> list[PlotRun]:
    """Every run with metrics.jsonl and config.yaml under ``root`` (of ``experiment`` if given)."""
    runs = []
    for path in sorted(root.glob("*/*/metrics.jsonl")):
        cfg = read_config(path.parent)
        if cfg is None:
            log.warning("skipping %s: no config.yaml", path.parent)
            continue
        ident = run_identity(cfg, path.parent)
        if experiment is None or ident["experiment"] == experiment:
            method = cfg.get("method", {})
            anchor = f"cached anchor k={method.get('anchor_k')}" if method.get("anchor") == "cache" else ""
            runs.append(PlotRun(path.parent, ident, bool(read_record(path.parent).get("collapsed")), anchor))
    return runs


def _run_order(run: PlotRun) -> tuple:
    i = run.ident
    return (METHOD_ORDER.index(i["method"]) if i["method"] in METHOD_ORDER else 99,
            -1.0 if math.isnan(i["kl_coef"]) else i["kl_coef"], i["kl_direction"], i.get("kl_schedule", ""), str(i["seed"]))


def plot_group(key: tuple[str, str, str, str], runs: list[PlotRun], out: Path) -> Path | None:
    """One figure (four panels, five with λ when it varies) for the runs of one (experiment, model, data, size);
    None if nothing to draw."""
    per_method = {}
    for run in runs:
        per_method[run.label(False)] = per_method.get(run.label(False), 0) + 1
    all_curves = {}
    for run in sorted(runs, key=_run_order):
        try:
            all_curves[run.run_dir] = read_curves(run.run_dir)
        except JsonlError as err:
            log.warning("skipping %s: %s", run.run_dir, err)
    varies = any(len({v for _s, v in c.get(LAMBDA_PANEL[0], [])}) > 1 for c in all_curves.values())
    panels = [*PANELS, LAMBDA_PANEL] if varies else PANELS
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    drawn = False
    for color, run in enumerate(sorted(runs, key=_run_order)):
        curves = all_curves.get(run.run_dir)
        if curves is None:
            continue
        for ax, (metric, _title) in zip(axes, panels):
            if curves.get(metric):
                steps, values = zip(*curves[metric])
                ax.plot(steps, values, color=f"C{color % 10}", label=run.label(per_method[run.label(False)] > 1))
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, (_metric, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    experiment, model, data, size = key
    fig.suptitle(f"{experiment}: {model}, {data} {size}")
    fig.tight_layout()
    path = out / ("kl_drift_" + "_".join(part.replace("/", "_") for part in key) + ".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("wrote %s", path)
    return path


def write_plots(root: Path, out: Path, experiment: str | None = None) -> list[Path]:
    """Every figure for the runs under ``root``; SystemExit with one line when there is nothing to draw."""
    if not root.is_dir():
        raise fail(f"no directory {root}", "pass --root <the folder holding <experiment>/<run>/ dirs>")
    groups: dict[tuple[str, str, str, str], list[PlotRun]] = {}
    for run in find_runs(root, experiment):
        groups.setdefault(run.figure_key, []).append(run)
    if groups:
        out.mkdir(parents=True, exist_ok=True)
    written = [p for key in sorted(groups) if (p := plot_group(key, groups[key], out)) is not None]
    if not written:
        where = f"{root}/{experiment}" if experiment else str(root)
        raise fail(f"no metrics.jsonl with curves under {where}", "train a run first (method=base logs none)")
    return written


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    parser = OneLineParser(prog="asft_repro.plots", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("outputs"))
    parser.add_argument("--experiment", default=None, help="only runs of this experiment_name")
    parser.add_argument("--out", type=Path, default=None, help="default: <root>/plots")
    args = parser.parse_args(argv)
    write_plots(args.root, args.out or args.root / "plots", args.experiment)


if __name__ == "__main__":
    main()
