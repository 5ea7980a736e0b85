"""KL-drift, DFT-weight ESS and loss curves from every run's metrics.jsonl (no wandb needed).

python -m asft_repro.plots [--root outputs] [--experiment demo] [--out outputs/plots]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [("kl_forward", "KL(base || policy)"), ("dft_weight_ess", "ESS of DFT weights"), ("ce", "cross-entropy"), ("loss", "training loss")]


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)], the last value kept when a resumed run re-logged a step."""
    by_step: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        for key, _title in PANELS:
            if isinstance(row.get(key), (int, float)):
                by_step.setdefault(key, {})[row["step"]] = float(row[key])
    return {k: sorted(v.items()) for k, v in by_step.items()}


def plot_experiment(exp_dir: Path, out: Path) -> Path | None:
    runs = sorted(p.parent for p in exp_dir.glob("*/metrics.jsonl"))
    if not runs:
        return None
    groups: dict[str, list[Path]] = {}
    for run in runs:  # one figure per (model, data, size): lines are methods
        parts = run.name.split("-")
        groups.setdefault("-".join(parts[:3]), []).append(run)
    out.mkdir(parents=True, exist_ok=True)
    last = None
    for key, members in groups.items():
        fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
        for run in members:
            curves = read_curves(run)
            label = run.name[len(key) + 1:]
            for ax, (metric, title) in zip(axes, PANELS):
                if metric in curves:
                    steps, values = zip(*curves[metric])
                    ax.plot(steps, values, label=label)
                ax.set_title(title)
                ax.set_xlabel("step")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{exp_dir.name}: {key}")
        fig.tight_layout()
        last = out / f"kl_drift_{exp_dir.name}_{key}.png"
        fig.savefig(last, dpi=110)
        plt.close(fig)
        print(f"[plots] {last}")
    return last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("outputs"))
    parser.add_argument("--experiment", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    exp_dirs = [args.root / args.experiment] if args.experiment else sorted(p for p in args.root.iterdir() if p.is_dir())
    written = [plot_experiment(d, args.out or args.root / "plots") for d in exp_dirs if d.is_dir()]
    if not any(written):
        raise SystemExit(f"asft_repro.plots: no metrics.jsonl under {args.root}; train a run first")


if __name__ == "__main__":
    main()
