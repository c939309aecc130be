"""`report.html`: one self-contained page per experiment (plots embedded as base64 PNG).

Input is one or more run directories (local or gs://), e.g. the SFT run and the RL run. From each it
reads what is there and skips what is not:
- `metrics.jsonl` -> training / validation loss curves, RL reward curves, other logged scalars;
- `run_summary.json` -> the summary table and HR@K / NDCG@K bars (runs side by side, so SFT and RL
  compare at a glance), with optional baseline rows (`baselines.json` from `rec baselines`);
- `eval_predictions.json` -> a few example rows (target, top predictions, hit rank);
- `config.yaml` -> the resolved config, folded.

Plots are drawn with matplotlib's Agg canvas directly (no pyplot global state), so this works in
threads, tests and headless machines alike.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import posixpath
import re
from collections.abc import Sequence

from rec import storage
from rec.errors import RecError

_KS = (1, 3, 5, 10, 20, 50)


# ---------------------------------------------------------------------------------------------
# Reading a run directory


def _read_json(path: str):
    return storage.read_json(path)


def read_metrics_jsonl(path: str) -> list[dict]:
    """Records of a metrics.jsonl; a torn last line (run killed mid-write) is ignored, others are errors."""
    lines = storage.read_text(path).splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise RecError(f"{path}:{number}: not a JSON object") from None
        if isinstance(record, dict):
            records.append(record)
    return records


def series_by_key(records: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """{"<stage>/<key>": (steps, values)} for every finite numeric scalar logged with a step (keys
    already starting with their stage, or records without a stage, keep their own name)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for record in records:
        step = record.get("step")
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            continue
        stage = record.get("stage")
        for key, value in record.items():
            if key in ("step", "stage", "time", "timestamp"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            prefixed = isinstance(stage, str) and stage and not key.startswith(stage + "/")
            name = f"{stage}/{key}" if prefixed else key
            steps, values = out.setdefault(name, ([], []))
            steps.append(float(step))
            values.append(float(value))
    return out


class RunData:
    """What one run directory holds (each part optional)."""

    def __init__(self, run_dir: str, label: str | None = None):
        self.dir = run_dir
        self.label = label or posixpath.basename(str(run_dir).rstrip("/")) or str(run_dir)
        join = storage.join
        self.summary: dict = {}
        self.series: dict[str, tuple[list[float], list[float]]] = {}
        self.config_text = ""
        self.predictions: list[dict] = []
        self.baselines: dict = {}
        if storage.exists(join(run_dir, "run_summary.json")):
            data = _read_json(join(run_dir, "run_summary.json"))
            self.summary = data if isinstance(data, dict) else {}
        if storage.exists(join(run_dir, "metrics.jsonl")):
            self.series = series_by_key(read_metrics_jsonl(join(run_dir, "metrics.jsonl")))
        if storage.exists(join(run_dir, "config.yaml")):
            self.config_text = storage.read_text(join(run_dir, "config.yaml"))
        if storage.exists(join(run_dir, "eval_predictions.json")):
            data = _read_json(join(run_dir, "eval_predictions.json"))
            self.predictions = data[:8] if isinstance(data, list) else []
        if storage.exists(join(run_dir, "baselines.json")):
            data = _read_json(join(run_dir, "baselines.json"))
            self.baselines = data if isinstance(data, dict) else {}

    def eval_figures(self, metric: str) -> dict[int, float]:
        """{K: value} of eval/<metric>@K in the summary."""
        prefix = f"eval/{metric}@"
        return {int(k[len(prefix) :]): float(v) for k, v in self.summary.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# Plots


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(width: float = 7.0, height: float = 3.6):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_curves(runs: Sequence[RunData], select, title: str, ylabel: str) -> str | None:
    """Line plot of every series whose key passes `select`, across runs; None if there is none."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for run in runs:
        for key in sorted(run.series):
            if not select(key):
                continue
            steps, values = run.series[key]
            style = "o-" if len(steps) <= 30 else "-"
            label = key if len(runs) == 1 or key.startswith(run.label + "/") else f"{run.label}: {key}"
            ax.plot(steps, values, style, markersize=3, linewidth=1.2, label=label)
            drawn += 1
    if not drawn:
        return None
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def plot_eval_bars(rows: list[tuple[str, dict[int, float], dict[int, float]]]) -> str | None:
    """Grouped bars: HR@K (left) and NDCG@K (right), one bar per row (run or baseline) at each K."""
    rows = [r for r in rows if r[1]]
    if not rows:
        return None
    ks = sorted({k for _, hr, _ in rows for k in hr})
    fig = _figure(10.0, 3.8)
    width = 0.8 / len(rows)
    for col, (name, index) in enumerate((("HR@K", 1), ("NDCG@K", 2))):
        ax = fig.add_subplot(1, 2, col + 1)
        for i, row in enumerate(rows):
            values = [row[index].get(k, 0.0) for k in ks]
            xs = [x + (i - (len(rows) - 1) / 2) * width for x in range(len(ks))]
            ax.bar(xs, values, width=width, label=row[0])
        ax.set_xticks(list(range(len(ks))))
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("K")
        ax.set_ylabel(name.replace("@K", ""))
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
    # one legend for both panels, below them, where it covers no bar
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(rows), 6), fontsize=7, frameon=False)
    fig.subplots_adjust(bottom=0.22)
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# HTML


def _is_loss(key: str) -> bool:
    low = key.lower()
    return "loss" in low and "best" not in low


def _is_reward(key: str) -> bool:
    low = key.lower()
    if "reward" in low:
        return not low.endswith("_std")
    return low.endswith("hit_rate")


_VAL_METRIC = re.compile(r"(?:^|/)(?:val/|val_)?(hr|ndcg)@(\d+)$")


def _val_metric_selector(runs: Sequence[RunData]):
    """HR/NDCG logged during training, at K = 10 when logged (else the largest K): one pair of
    lines per stage instead of a dozen."""
    ks = {int(m.group(2)) for r in runs for k in r.series if (m := _VAL_METRIC.search(k))}
    if not ks:
        return lambda key: False
    chosen = 10 if 10 in ks else max(ks)

    def select(key: str) -> bool:
        match = _VAL_METRIC.search(key)
        return bool(match) and int(match.group(2)) == chosen

    return select


def _stages(runs: Sequence[RunData]) -> list[str]:
    """Stage prefixes of the logged series, in first-seen order ("" for unprefixed keys)."""
    stages: list[str] = []
    for run in runs:
        for key in run.series:
            stage = key.split("/", 1)[0] if "/" in key else ""
            if stage not in stages:
                stages.append(stage)
    return stages


def _img(b64: str | None, alt: str) -> str:
    if not b64:
        return ""
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"></figure>'


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    return html.escape(str(value))


def _summary_order(key: str):
    """eval/* first, then the rest; eval/hr@K sorted by numeric K rather than as text."""
    name, _, k = key.partition("@")
    return (not key.startswith("eval/"), name, int(k) if k.isdigit() else 0, key)


def summary_table(runs: Sequence[RunData]) -> str:
    keys: list[str] = []
    for run in runs:
        for key in run.summary:
            if key not in keys:
                keys.append(key)
    if not keys:
        return "<p>No run_summary.json found.</p>"
    keys.sort(key=_summary_order)
    head = "".join(f"<th>{html.escape(r.label)}</th>" for r in runs)
    body = "".join(
        f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{_fmt(r.summary[k]) if k in r.summary else ''}</td>" for r in runs) + "</tr>"
        for k in keys
    )
    return f"<table><tr><th>key</th>{head}</tr>{body}</table>"


def baseline_table(baselines: dict) -> str:
    if not baselines:
        return ""
    names = list(baselines)
    keys = [k for k in next(iter(baselines.values())) if "@" in k]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join(
        f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{_fmt(baselines[n].get(k, ''))}</td>" for k in keys) + "</tr>"
        for n in names
    )
    return f"<h3>Baselines (same metric)</h3><table><tr><th>method</th>{head}</tr>{body}</table>"


def predictions_table(run: RunData) -> str:
    if not run.predictions:
        return ""
    rows = []
    for record in run.predictions:
        target = str(record.get("output", "")).strip()
        predict = [str(p) for p in record.get("predict", [])]
        rank = predict.index(target) + 1 if target in predict else None
        shown = ", ".join(f"<b>{html.escape(p)}</b>" if p == target else html.escape(p) for p in predict[:5])
        rows.append(f"<tr><td>{html.escape(target)}</td><td>{shown}</td><td>{rank if rank else '-'}</td></tr>")
    return (
        f"<h3>{html.escape(run.label)}: first predictions</h3>"
        f"<table><tr><th>target</th><th>top 5 predictions</th><th>rank</th></tr>{''.join(rows)}</table>"
    )


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}img{max-width:100%}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}
figure{margin:0.5em 0}.muted{color:#777}
"""


def render_report(runs: Sequence[RunData], title: str = "rec report", baselines: dict | None = None) -> str:
    """The whole HTML page as a string."""
    baselines = dict(baselines or {})
    for run in runs:
        baselines.update(run.baselines)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='muted'>generated {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} from "
        + ", ".join(f"<code>{html.escape(str(r.dir))}</code>" for r in runs)
        + "</p>",
        "<h2>Evaluation</h2>",
    ]
    bar_rows = [(r.label, r.eval_figures("hr"), r.eval_figures("ndcg")) for r in runs]
    for name, figures in baselines.items():
        hr = {int(k[3:]): v for k, v in figures.items() if k.startswith("hr@")}
        ndcg = {int(k[5:]): v for k, v in figures.items() if k.startswith("ndcg@")}
        bar_rows.append((name, hr, ndcg))
    bars = plot_eval_bars(bar_rows)
    parts.append(_img(bars, "HR@K and NDCG@K") or "<p>No evaluation figures yet.</p>")
    parts.append(summary_table(runs))
    parts.append(baseline_table(baselines))

    parts.append("<h2>Training</h2>")
    val_selector = _val_metric_selector(runs)
    curves = []
    for stage in _stages(runs):
        in_stage = (lambda k, s=stage: k.startswith(s + "/")) if stage else (lambda k: "/" not in k)
        label = stage.upper() if stage else "metrics"
        curves += [
            plot_curves(runs, lambda k, f=in_stage: f(k) and _is_loss(k), f"{label}: loss", "loss"),
            plot_curves(runs, lambda k, f=in_stage: f(k) and _is_reward(k), f"{label}: reward and hit rate", "value"),
            plot_curves(runs, lambda k, f=in_stage: f(k) and val_selector(k), f"{label}: validation HR / NDCG", "value"),
        ]
    if not any(curves):
        parts.append("<p>No metrics.jsonl found.</p>")
    parts += [_img(c, "training curve") for c in curves]

    parts += [predictions_table(r) for r in runs]
    parts.append("<h2>Configs</h2>")
    for run in runs:
        if run.config_text:
            parts.append(
                f"<details><summary>{html.escape(run.label)}: config.yaml</summary>"
                f"<pre>{html.escape(run.config_text)}</pre></details>"
            )
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def write_report(
    run_dirs: str | Sequence[str],
    out_html: str,
    labels: Sequence[str] | None = None,
    title: str = "rec report",
    baselines: dict | None = None,
) -> str:
    """Write a self-contained report.html for one or more run directories; returns its path."""
    if isinstance(run_dirs, str):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise RecError("report: no run directory given")
    for run_dir in run_dirs:
        if not storage.exists(run_dir):
            raise RecError(f"{run_dir}: run directory not found")
    labels = list(labels) if labels else [None] * len(run_dirs)
    runs = [RunData(d, label) for d, label in zip(run_dirs, labels, strict=True)]
    storage.write_text(out_html, render_report(runs, title=title, baselines=baselines))
    return out_html
