"""The adaptive-λ demonstration's check and figure (``make schedule-demo``).

python -m asft_repro.schedule_demo [--root outputs] [--experiment schedule_demo] [--figure docs/lambda_schedule_demo.png]

For every run of the experiment with ``method.kl_schedule=adaptive``: the mean over the second half of its logged
optimizer steps of the token-mean KL in the optimized direction (``kl_forward`` = KL(base || policy) for forward),
against its ``method.kl_target``, and the range λ (``kl_coef``) covered. A run holds its target when that mean lies
within ±20% of it. Runs of the experiment with a constant λ are listed (and drawn) as references, without a target.
The command prints one line per run and exits 1 when an adaptive run misses its target.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from asft_repro.cli import OneLineParser, cli_error, setup_logging  # noqa: E402
from asft_repro.jsonl import read_jsonl  # noqa: E402
from asft_repro.tables import KL_METHODS, read_config  # noqa: E402

TOLERANCE = 0.2  # |second-half mean KL / target - 1| <= 20%
log = logging.getLogger(__name__)


fail = functools.partial(cli_error, "asft_repro.schedule_demo")  # fail(what, fix): the one-line CLI error


@dataclass
class KLHold:
    """One run's second-half KL against its target (``target`` None for a constant-λ reference run)."""

    name: str
    seed: Any
    target: float | None
    mean_kl: float
    steps: int  # logged optimizer steps; the second half starts at row steps // 2
    lambda_first: float
    lambda_last: float
    lambda_low: float
    lambda_high: float

    @property
    def ratio(self) -> float:
        return self.mean_kl / self.target if self.target else math.nan

    @property
    def holds(self) -> bool:
        return self.target is not None and abs(self.ratio - 1.0) <= TOLERANCE

    @property
    def lambda_moved(self) -> bool:
        return self.lambda_high > self.lambda_low

    def line(self) -> str:
        lam = f"λ {self.lambda_first:.4g} -> {self.lambda_last:.4g} (range {self.lambda_low:.4g}..{self.lambda_high:.4g})"
        if self.target is None:
            return f"{self.name} (constant λ reference, seed {self.seed}): second-half mean KL {self.mean_kl:.4f}; {lam}"
        verdict = "holds" if self.holds else "MISSES"
        return (f"{self.name} (seed {self.seed}): target {self.target:g}, second-half mean KL {self.mean_kl:.4f} "
                f"= {self.ratio:.2f} x target ({verdict} ±{TOLERANCE:.0%}); {lam}")


def training_rows(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The rows carrying ``key`` (training steps), one per step (a re-logged step keeps its last row), by step."""
    by_step = {int(r["step"]): r for r in rows if isinstance(r.get(key), (int, float)) and "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def kl_hold(name: str, rows: list[dict[str, Any]], target: float | None, direction: str = "forward",
            seed: Any = None) -> KLHold:
    """The check on one run's metrics rows (metrics.jsonl): the second-half mean KL, and λ's range over all steps."""
    key = f"kl_{direction}"
    ordered = training_rows(rows, key)
    if not ordered:
        raise fail(f"{name} logged no {key}", "train it first (asft and sft_kl log the KL every step)")
    half = ordered[len(ordered) // 2:]
    lambdas = [float(r["kl_coef"]) for r in ordered if isinstance(r.get("kl_coef"), (int, float))] or [math.nan]
    return KLHold(name, seed, target, sum(float(r[key]) for r in half) / len(half), len(ordered),
                  lambdas[0], lambdas[-1], min(lambdas), max(lambdas))


@dataclass
class DemoRun:
    """A run of the experiment: its check and its metrics rows (for the figure)."""

    hold: KLHold
    direction: str
    rows: list[dict[str, Any]]


def find_demo_runs(root: Path, experiment: str) -> list[DemoRun]:
    """Every ASFT / SFT+KL run under ``root/experiment`` with metrics.jsonl: adaptive ones with their kl_target,
    constant-λ ones as references; a run with another schedule is left out."""
    found = []
    for path in sorted((root / experiment).glob("*/metrics.jsonl")):
        cfg = read_config(path.parent) or {}
        method = cfg.get("method") or {}
        schedule = method.get("kl_schedule") or "constant"
        if method.get("name") not in KL_METHODS or schedule not in ("adaptive", "constant"):
            continue
        rows = read_jsonl(path, repair=False)
        direction = method.get("kl_direction", "forward")
        target = float(method["kl_target"]) if schedule == "adaptive" else None
        hold = kl_hold(path.parent.name, rows, target, direction, (cfg.get("train") or {}).get("seed"))
        found.append(DemoRun(hold, direction, rows))
    return found


def draw(runs: list[DemoRun], path: Path) -> Path:
    """KL per step (each target as a dashed line in a ±20% band over the second half) and λ per step (log scale)."""
    fig, (ax_kl, ax_lam) = plt.subplots(1, 2, figsize=(11, 3.8))
    targets = sorted({r.hold.target for r in runs if r.hold.target is not None})
    seeds = sorted({str(r.hold.seed) for r in runs})
    for run in runs:
        h = run.hold
        color = f"C{targets.index(h.target)}" if h.target is not None else "0.5"
        style = ["-", "--", ":", "-."][seeds.index(str(h.seed)) % 4]
        label = (f"adaptive, target {h.target:g}" if h.target is not None else f"constant λ={h.lambda_first:g}") + f", seed {h.seed}"
        rows = training_rows(run.rows, f"kl_{run.direction}")
        steps = [int(r["step"]) for r in rows]
        ax_kl.plot(steps, [r[f"kl_{run.direction}"] for r in rows], color=color, linestyle=style, linewidth=1.2, label=label)
        lam = [(int(r["step"]), r["kl_coef"]) for r in rows if isinstance(r.get("kl_coef"), (int, float))]
        if lam:
            ax_lam.plot(*zip(*lam), color=color, linestyle=style, linewidth=1.2, label=label)
    last = max(r.hold.steps for r in runs)
    for i, target in enumerate(targets):
        ax_kl.axhline(target, color=f"C{i}", linewidth=0.8, linestyle="--")
        ax_kl.fill_between([last / 2, last], target * (1 - TOLERANCE), target * (1 + TOLERANCE), color=f"C{i}", alpha=0.12)
    direction = "KL(base || policy)" if all(r.direction == "forward" for r in runs) else "KL (optimized direction)"
    ax_kl.set(title=f"{direction} per step; band: target ±{TOLERANCE:.0%} over the second half", xlabel="optimizer step")
    ax_lam.set(title="λ in force (kl_coef)", xlabel="optimizer step", yscale="log")
    ax_kl.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    parser = OneLineParser(prog="asft_repro.schedule_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("outputs"))
    parser.add_argument("--experiment", default="schedule_demo")
    parser.add_argument("--figure", type=Path, default=None, help="write the figure here (PNG)")
    args = parser.parse_args(argv)
    runs = find_demo_runs(args.root, args.experiment)
    adaptive = [r.hold for r in runs if r.hold.target is not None]
    if not adaptive:
        raise fail(f"no run with method.kl_schedule=adaptive under {args.root / args.experiment}", "run `make schedule-demo`")
    for run in runs:
        print(run.hold.line())
    if args.figure:
        log.info("wrote %s", draw(runs, args.figure))
    missed = [h.name for h in adaptive if not h.holds or not h.lambda_moved]
    print(f"{len(adaptive) - len(missed)} of {len(adaptive)} adaptive runs hold their target (±{TOLERANCE:.0%}) "
          f"with λ moving")
    if missed:
        raise fail(f"{len(missed)} run(s) miss their target or λ never moved: {', '.join(missed)}",
                   "use a reachable kl_target (see a constant-λ run's KL) or a shorter kl_horizon")


if __name__ == "__main__":
    main()
