"""A reproduction report to browse: one self-contained HTML page per experiment.

python -m asft_repro.report [--root outputs] --experiment demo [--out outputs/reports/demo/index.html] [--no-wandb]

The page (inline CSS and JS, figures as base64 PNG, nothing fetched at view time) holds: Table 1 and the ablation
tables with 95% intervals beside the paper's numbers (asft_repro/tables.py + intervals.py); every paired
comparison (comparisons.csv's rows); the KL-drift figure in the style of the paper's Figure 1, KL(base || policy)
against step per method, one row per (model, domain), with the DFT-weight ESS and cross-entropy panels and λ when
a run's metrics rows carry a varying ``kl_coef`` (curves read by asft_repro/plots.py); every run with its config,
hashes and status; and a per-sample browser: for each benchmark of each Table 1, every item with its question
(from the benchmark file that was scored), its gold answer and each method's first output, parsed answer and
correctness side by side, searchable and filterable to the items the methods score differently. When the runs
report to wandb (``wandb.mode`` not ``disabled``), the scores and comparisons go to wandb Tables and the page to a
wandb artifact (offline by default).
"""

from __future__ import annotations

import functools
import base64
import html
import io
import json
import logging
import numbers
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from asft_repro.cli import OneLineParser, cli_error, setup_logging  # noqa: E402
from asft_repro.intervals import annotate, eval_dirs  # noqa: E402
from asft_repro.jsonl import JsonlError, read_jsonl  # noqa: E402
from asft_repro.plots import PlotRun, find_runs, read_curves  # noqa: E402
from asft_repro.records import question_texts, read_records  # noqa: E402
from asft_repro.tables import ResultTable, collect_runs, make_tables, read_config, run_flag, run_identity  # noqa: E402

OUTPUT_CHARS = 6000  # a longer first output is cut on the page (the records keep it whole)
FIGURE_PANELS = [("kl_forward", "KL(base || policy)"), ("dft_weight_ess", "ESS of DFT weights"), ("ce", "cross-entropy")]
log = logging.getLogger(__name__)


fail = functools.partial(cli_error, "asft_repro.report")  # fail(what, fix): the one-line CLI error


# ---- what goes on the page ---------------------------------------------------------------------------------

def all_runs(root: Path, experiment: str) -> list[dict[str, Any]]:
    """Every run directory of ``experiment`` with a config.yaml (evaluated or not): identity, status, hashes."""
    found = []
    for path in sorted(root.glob("*/*/config.yaml")):
        run_dir = path.parent
        cfg = read_config(run_dir) or {}
        try:
            ident = run_identity(cfg, run_dir)
        except (KeyError, TypeError):
            continue
        if ident["experiment"] != experiment:
            continue
        try:
            record = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
        except ValueError:
            record = {}
        evals = []
        for metrics_path in sorted(run_dir.glob("eval/*/metrics.json")):
            try:
                metrics = json.loads(metrics_path.read_text())
            except ValueError:
                continue
            evals.append({"settings_hash": metrics_path.parent.name, "model_path": metrics.get("model_path", "")})
        status = record.get("train_status", "no run.json" if not record else "complete")
        found.append({"run_dir": str(run_dir), "name": str(run_dir.relative_to(root)), "ident": ident,
                      "config_text": path.read_text(encoding="utf-8"),
                      "config_hash": record.get("config_hash", ""), "status": status, "flag": run_flag(record),
                      "collapse_reason": record.get("collapse_reason", ""), "evals": evals,
                      "wandb_mode": (cfg.get("wandb") or {}).get("mode", "offline")})  # the schema's default
    return found


def _lambda_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, λ) from metrics.jsonl rows that carry ``kl_coef``; [] when λ never changes."""
    try:
        rows = read_jsonl(run_dir / "metrics.jsonl", repair=False)
    except JsonlError:
        return []
    points = {int(r["step"]): float(r["kl_coef"]) for r in rows if "step" in r and isinstance(r.get("kl_coef"), (int, float))}
    return sorted(points.items()) if len(set(points.values())) > 1 else []


def kl_figure(root: Path, experiment: str) -> str | None:
    """Figure 1 in the paper's style as a base64 PNG: one row per (model, domain), one line per run; None if no curves."""
    groups: dict[tuple[str, str], list[PlotRun]] = {}
    for run in find_runs(root, experiment):
        groups.setdefault((run.ident["model"], run.ident["domain"]), []).append(run)
    curves = {}
    for runs in groups.values():
        for run in runs:
            try:
                curves[run.run_dir] = {**read_curves(run.run_dir), "kl_coef": _lambda_curve(run.run_dir)}
            except JsonlError as err:
                log.warning("asft_repro.report: skipping %s: %s", run.run_dir, err)
                curves[run.run_dir] = {}
    groups = {k: v for k, v in groups.items() if any(curves[r.run_dir].get(m) for r in v for m, _ in FIGURE_PANELS)}
    if not groups:
        return None
    panels = FIGURE_PANELS + ([("kl_coef", "λ (kl_coef)")] if any(c.get("kl_coef") for c in curves.values()) else [])
    fig, axes = plt.subplots(len(groups), len(panels), figsize=(4.3 * len(panels), 3.3 * len(groups)), squeeze=False)
    for row, ((model, domain), runs) in enumerate(sorted(groups.items())):
        sizes = {r.ident["size"] for r in runs if r.ident["size"]}
        labels = [r.label(False) for r in runs]
        for color, run in enumerate(sorted(runs, key=lambda r: (r.ident["size"], r.label(True)))):
            label = run.label(labels.count(run.label(False)) > 1) + (f" {run.ident['size']}" if len(sizes) > 1 else "")
            for ax, (metric, _title) in zip(axes[row], panels):
                if curves[run.run_dir].get(metric):
                    steps, values = zip(*curves[run.run_dir][metric])
                    ax.plot(steps, values, color=f"C{color % 10}", label=label)
        for ax, (_metric, title) in zip(axes[row], panels):
            ax.set_title(f"{title}\n{model}, {domain}", fontsize=9)
            ax.set_xlabel("step")
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _settings(eval_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((eval_dir / "metrics.json").read_text()).get("settings") or {}
    except (OSError, ValueError):
        return {}


def sample_groups(tables: dict[str, ResultTable], runs: pd.DataFrame) -> list[dict[str, Any]]:
    """For each benchmark of each Table 1: every item with its question, gold and each method's first answer."""
    groups = []
    for name, table in tables.items():
        if not name.startswith("table1"):
            continue
        methods = []  # (label, eval dir of the cell's first run)
        for label, cell in table.frame.iterrows():
            dirs = eval_dirs(cell, runs)
            if dirs:
                methods.append((str(label), dirs[0]))
        for column, shown in table.columns:
            if column == table.avg or not methods:
                continue
            records = [read_records(d, column) for _label, d in methods]
            if not any(records):
                continue
            first = next(d for (_l, d), r in zip(methods, records) if r)
            cfg = read_config(first.parent.parent) or {}
            bdir = (cfg.get("eval") or {}).get("benchmarks_dir")
            scored = (_settings(first).get("benchmarks") or {}).get(column)
            questions = question_texts(bdir, column, scored) if bdir else {}
            keys = list(dict.fromkeys(k for r in records for k in r))
            items = []
            for key in keys:
                answers = []
                for r in records:
                    rec = r.get(key)
                    if rec is None:
                        answers.append(None)
                        continue
                    out = (rec.get("outputs") or [""])[0] or ""
                    out = out if len(out) <= OUTPUT_CHARS else out[:OUTPUT_CHARS] + " …[cut]"
                    parsed = (rec.get("parsed") or [None])[0]
                    answers.append([out, "" if parsed is None else str(parsed), bool(rec["correct"][0])])
                gold = next((str(r[key].get("answer", "")) for r in records if key in r), "")
                verdicts = {a[2] for a in answers if a is not None}
                items.append({"key": key, "q": questions.get(key, ""), "gold": gold, "a": answers, "d": len(verdicts) > 1})
            groups.append({"table": name, "benchmark": column, "label": shown, "title": table.title,
                           "methods": [label for label, _d in methods], "runs": [str(d.parent.parent) for _l, d in methods],
                           "items": items})
    return groups


# ---- HTML --------------------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1b1f24;background:#fafbfc}
header{background:#24292f;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}header p{margin:4px 0 0;color:#c9d1d9}
nav{padding:8px 24px;background:#eaeef2;position:sticky;top:0;z-index:2}nav a{margin-right:16px;color:#0969da;text-decoration:none}
main{padding:8px 24px 40px}section{margin-bottom:28px}h2{border-bottom:1px solid #d0d7de;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;background:#fff}th,td{border:1px solid #d0d7de;padding:4px 8px;vertical-align:top}
th{background:#f6f8fa;text-align:left}td.num,table.scores td{text-align:right;white-space:nowrap}table.scores td:first-child{text-align:left}
.caption{color:#57606a;font-size:13px}ol.notes{color:#57606a;font-size:12.5px;max-width:1200px}
tr.sig td{background:#fff8c5}.ok{border-left:4px solid #2da44e}.bad{border-left:4px solid #cf222e}.missing{color:#8c959f}
.answer{padding:2px 6px;min-width:220px;max-width:420px}.answer pre{white-space:pre-wrap;font-size:12px;max-height:160px;overflow:auto;margin:4px 0 0;background:#f6f8fa;padding:4px}
.q{max-width:420px;white-space:pre-wrap}.controls{position:sticky;top:36px;background:#fafbfc;padding:6px 0;z-index:1}
.controls input[type=search]{width:320px;padding:4px}details pre{max-height:360px;overflow:auto;background:#f6f8fa;padding:8px}
img.figure{max-width:100%;border:1px solid #d0d7de;background:#fff}
"""

GUARD_JS = """
window.__reportErrors = 0;
function __mark() { var s = document.getElementById('js-status'); if (s) s.setAttribute('data-errors', String(window.__reportErrors)); }
window.addEventListener('error', function () { window.__reportErrors++; __mark(); });
(function () { var e = console.error; console.error = function () { window.__reportErrors++; __mark(); return e.apply(console, arguments); }; })();
"""

BROWSER_JS = """
(function () {
  var data = JSON.parse(document.getElementById('sample-data').textContent);
  var root = document.getElementById('samples'), rows = [];
  function esc(s) { return String(s).replace(/[&<>"']/g, function (c) { return {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]; }); }
  var select = document.getElementById('bench');
  data.forEach(function (g, gi) {
    var opt = document.createElement('option'); opt.value = String(gi); opt.textContent = g.label + ' (' + g.table + ')';
    opt.setAttribute('data-benchmark', g.benchmark); select.appendChild(opt);
    var html = ['<h3>' + esc(g.label) + ' <span class="caption">' + esc(g.table) + ': ' + g.items.length + ' items</span></h3>',
                '<table class="items"><thead><tr><th>item</th><th>question</th><th>gold</th>'];
    g.methods.forEach(function (m, mi) { html.push('<th title="' + esc(g.runs[mi]) + '">' + esc(m) + '</th>'); });
    html.push('</tr></thead><tbody>');
    g.items.forEach(function (it, ii) {
      html.push('<tr class="item" data-g="' + gi + '" data-i="' + ii + '"><td>' + esc(it.key) + '</td><td class="q">' +
                esc(it.q || '(question text not available: ' + it.key + ')') + '</td><td>' + esc(it.gold) + '</td>');
      it.a.forEach(function (a) {
        if (!a) { html.push('<td class="missing">not scored</td>'); return; }
        html.push('<td class="answer ' + (a[2] ? 'ok' : 'bad') + '"><b>' + (a[2] ? '✓ ' : '✗ ') + esc(a[1] || '(unparsed)') +
                  '</b>' + (a[0] ? '<pre>' + esc(a[0]) + '</pre>' : '') + '</td>');
      });
      html.push('</tr>');
      var hay = [it.key, it.q, it.gold].concat(it.a.map(function (a) { return a ? a[0] + ' ' + a[1] : ''; })).join(' ').toLowerCase();
      rows.push({g: gi, d: it.d, hay: hay});
    });
    html.push('</tbody></table>');
    var sec = document.createElement('section');
    sec.className = 'bench'; sec.setAttribute('data-benchmark', g.benchmark); sec.setAttribute('data-table', g.table);
    sec.innerHTML = html.join('');
    root.appendChild(sec);
  });
  var trs = root.querySelectorAll('tr.item'), sections = root.querySelectorAll('section.bench');
  var q = document.getElementById('q'), dis = document.getElementById('disagree'), count = document.getElementById('shown-count');
  function apply() {
    var term = q.value.trim().toLowerCase(), only = dis.checked, b = select.value, shown = 0;
    for (var i = 0; i < trs.length; i++) {
      var r = rows[i], ok = (b === 'all' || String(r.g) === b) && (!only || r.d) && (!term || r.hay.indexOf(term) >= 0);
      trs[i].hidden = !ok; if (ok) shown++;
    }
    for (var s = 0; s < sections.length; s++) sections[s].hidden = !(b === 'all' || String(s) === b);
    count.textContent = shown + ' of ' + rows.length + ' items shown';
    count.setAttribute('data-shown', String(shown));
  }
  var params = new URLSearchParams(location.hash.replace(/^#/, ''));
  if (params.get('q')) q.value = params.get('q');
  if (params.get('disagree') === '1') dis.checked = true;
  for (var o = 0; o < select.options.length; o++) if (params.get('bench') && select.options[o].getAttribute('data-benchmark') === params.get('bench')) select.value = select.options[o].value;
  q.addEventListener('input', apply); dis.addEventListener('change', apply); select.addEventListener('change', apply);
  apply();
  var cf = document.getElementById('cmp-filter');
  cf.addEventListener('input', function () {
    var t = cf.value.trim().toLowerCase(), trc = document.querySelectorAll('#comparisons tbody tr');
    for (var i = 0; i < trc.length; i++) trc[i].hidden = t && trc[i].textContent.toLowerCase().indexOf(t) < 0;
  });
  var st = document.getElementById('js-status'); st.setAttribute('data-ready', '1'); __mark();
})();
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def table_html(table: ResultTable) -> str:
    """One result table: its title, the displayed cells (score ± half-width, †, paper), its footnotes."""
    shown = table.display()
    head = "".join(f"<th>{_e(c)}</th>" for c in [shown.index.name or "", *shown.columns])
    body = "".join("<tr>" + f"<td>{_e(label)}</td>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>"
                   for label, row in zip(shown.index, shown.values.tolist()))
    notes = "".join(f"<li>{_e(n)}</li>" for n in table.footnotes)
    return (f'<h3 id="{_e(table.name)}">{_e(table.name)}</h3><p class="caption">{_e(table.title)}</p>'
            f'<table class="scores"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table><ol class="notes">{notes}</ol>')


def comparisons_html(comparisons: pd.DataFrame) -> str:
    """Every paired comparison (acc first), significant rows (Holm p < 0.05) highlighted."""
    if comparisons.empty:
        return "<p>No comparisons: no two cells of one table have per-sample records on the same items.</p>"
    cols = ["table", "size", "benchmark", "metric", "method_a", "method_b", "delta", "ci_low", "ci_high", "p_value",
            "p_holm", "n_items", "mde"]
    frame = comparisons.sort_values(["metric", "table", "size", "method_a", "method_b"], kind="stable")
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    rows = []
    for _, r in frame.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            text = f"{v:.4g}" if c in ("p_value", "p_holm") else f"{v:+.2f}" if c == "delta" else \
                f"{v:.2f}" if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) else str(v)
            cells.append(f'<td class="num">{_e(text)}</td>' if isinstance(v, numbers.Real) else f"<td>{_e(text)}</td>")
        rows.append(f'<tr class="{"sig" if r["p_holm"] < 0.05 else ""}">' + "".join(cells) + "</tr>")
    return ('<p class="caption">delta = method_a − method_b in points with its 95% paired bootstrap interval; p: two-sided '
            'sign-flip permutation test over items (exact McNemar for 0/1 scores), p_holm: Holm-adjusted across the '
            'table\'s comparisons of one metric (highlighted below 0.05); mde: the smallest difference these items detect '
            'with 80% power. <input id="cmp-filter" type="search" placeholder="filter rows (e.g. acc AIME24)"></p>'
            f'<table id="comparisons"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def runs_html(runs: list[dict[str, Any]]) -> str:
    """Every run: identity, status, hashes, eval folders, its config.yaml."""
    head = "".join(f"<th>{c}</th>" for c in ["run", "method", "domain", "size", "λ / KL", "seed", "status", "config hash",
                                              "eval settings", "config"])
    rows = []
    for r in runs:
        i = r["ident"]
        kl = f"{i['kl_coef']:g} {i['kl_direction']}" if i["kl_direction"] else ""
        status = r["status"] + (f" ({r['flag']}: {r['collapse_reason']})" if r["flag"] else "")
        evals = "<br>".join(_e(e["settings_hash"]) for e in r["evals"]) or "not evaluated"
        config = _e(r["config_text"])
        rows.append(f'<tr class="run" data-run="{_e(r["name"])}"><td>{_e(r["name"])}</td><td>{_e(i["method"])}</td>'
                    f'<td>{_e(i["domain"])}</td><td>{_e(i["size"])}</td><td>{_e(kl)}</td><td>{_e(i["seed"])}</td>'
                    f'<td>{_e(status)}</td><td><code>{_e(r["config_hash"])}</code></td><td><code>{evals}</code></td>'
                    f"<td><details><summary>config.yaml</summary><pre>{config}</pre></details></td></tr>")
    return f'<table id="runs"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def render(experiment: str, root: Path, tables: dict[str, ResultTable], comparisons: pd.DataFrame,
           runs: list[dict[str, Any]], figure: str | None, samples: list[dict[str, Any]]) -> str:
    """The whole page as one string."""
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table1 = [t for n, t in tables.items() if n.startswith("table1")]
    other = [t for n, t in tables.items() if not n.startswith("table1")]
    fig = (f'<img class="figure" alt="KL drift" src="data:image/png;base64,{figure}">' if figure
           else "<p>No training curves (metrics.jsonl) for this experiment.</p>")
    data = json.dumps(samples, ensure_ascii=False).replace("</", "<\\/")
    n_items = sum(len(g["items"]) for g in samples)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(experiment)}: reproduction report</title><style>{CSS}</style><script>{GUARD_JS}</script></head>
<body><div id="js-status" hidden data-ready="0" data-errors="0"></div>
<header><h1>Anchored SFT reproduction: {_e(experiment)}</h1>
<p>{len(runs)} runs under {_e(root)}; {len(tables)} tables; {n_items} items in the sample browser; generated {generated}
by <code>python -m asft_repro.report</code>.</p></header>
<nav><a href="#table1">Table 1</a><a href="#comparisons-section">Paired comparisons</a><a href="#kl">KL drift</a>
<a href="#runs-section">Runs</a><a href="#browser">Per-sample browser</a></nav>
<main>
<section id="table1"><h2>Table 1 with 95% intervals</h2>
<p class="caption">score ± half-width of the 95% bootstrap interval over items (and seeds); † = differs from SFT of the same
size after Holm; the paper's published average beside ours, and whether it lies inside our interval.</p>
{"".join(table_html(t) for t in table1) or "<p>No Table 1 for this experiment.</p>"}
{"<h2>Ablations</h2>" + "".join(table_html(t) for t in other) if other else ""}</section>
<section id="comparisons-section"><h2>Paired comparisons</h2>{comparisons_html(comparisons)}</section>
<section id="kl"><h2>KL drift (Figure 1 style)</h2><p class="caption">KL(base ‖ policy) per training step for each method,
with the effective sample size of the DFT weights and the cross-entropy; one row per model and domain.</p>{fig}</section>
<section id="runs-section"><h2>Runs</h2>{runs_html(runs)}</section>
<section id="browser"><h2>Per-sample browser</h2>
<div class="controls"><input id="q" type="search" placeholder="search questions, golds, outputs, item ids">
<label><input id="disagree" type="checkbox"> only items the methods score differently</label>
<select id="bench"><option value="all">all benchmarks</option></select> <span id="shown-count"></span></div>
<div id="samples"></div></section>
</main>
<script type="application/json" id="sample-data">{data}</script>
<script>{BROWSER_JS}</script>
</body></html>
"""


# ---- wandb and the command line --------------------------------------------------------------------------

def log_wandb(page: Path, scores: pd.DataFrame, comparisons: pd.DataFrame, experiment: str, project: str) -> Path:
    """``<experiment>-report``: the scores and comparisons as wandb Tables, the page as an artifact; offline by default."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run = wandb.init(project=project, name=f"{experiment}-report", group=experiment, job_type="report",
                     dir=str(page.parent), reinit="finish_previous")
    run.log({name: wandb.Table(dataframe=f.astype(object).where(f.notna(), None))
             for name, f in (("scores", scores), ("comparisons", comparisons))})
    artifact = wandb.Artifact(re.sub(r"[^\w.-]+", "_", f"{experiment}-report"), type="report")
    artifact.add_file(str(page), name="index.html")
    run.log_artifact(artifact)
    folder = Path(run.dir).parent
    run.finish()
    return folder


def write_report(root: Path, experiment: str, out: Path | None = None, use_wandb: bool = True) -> Path:
    """Build and write the page; SystemExit with one line when the experiment has no evaluated run."""
    if not root.is_dir():
        raise fail(f"no directory {root}", "pass --root <the folder holding <experiment>/<run>/ dirs>")
    runs = collect_runs(root, experiment)
    if runs.empty:
        raise fail(f"no run with eval/<settings>/metrics.json under {root}/{experiment}",
                   "train with eval.after_train=true (or run python -m eval.run) first, or check --experiment")
    tables = make_tables(runs)
    scores, comparisons = annotate(tables, runs)
    everything = all_runs(root, experiment)
    page = out or root / "reports" / experiment / "index.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render(experiment, root, tables, comparisons, everything, kl_figure(root, experiment),
                           sample_groups(tables, runs)), encoding="utf-8")
    log.info("wrote %s (open it in a browser: file://%s)", page, page.resolve())
    if use_wandb and os.environ.get("WANDB_MODE") != "disabled" and any(r["wandb_mode"] != "disabled" for r in everything):
        projects = runs["wandb_project"].dropna()
        log.info("logged to wandb: %s", log_wandb(page, scores, comparisons, experiment,
                                                  str(projects.iloc[0]) if len(projects) else "asft-repro"))
    return page


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="asft_repro.report", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("outputs"))
    parser.add_argument("--experiment", required=True, help="the experiment_name to report")
    parser.add_argument("--out", type=Path, default=None, help="default: <root>/reports/<experiment>/index.html")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the scores and the page to wandb")
    args = parser.parse_args(argv)
    setup_logging()
    write_report(args.root, args.experiment, args.out, use_wandb=not args.no_wandb)


if __name__ == "__main__":
    main()
