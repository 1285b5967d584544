"""A run's history and its one-page HTML report: ``stream-mtl report runs/<name>``.

While a worker runs with a ``run_dir``, :class:`MetricsHistory` appends one compact line per
metrics snapshot to ``<run_dir>/metrics.jsonl`` (bounded: past ``max_lines`` the oldest half is
dropped). :func:`write_report` turns it into ``<run_dir>/report.html`` (plotly, self-contained):
per task the prequential metric of each interval (not the running average, so a drift shows)
with a marker at every drift alert, the share of each task in the mini-batches, the loss
weights, and links to the evidently feature-drift reports under ``<run_dir>/reports``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

__all__ = ["MetricsHistory", "write_report"]

#: The metric plotted per task kind (a mean over events, so an interval's value can be recovered).
PLOTTED = {"binary": "accuracy", "multiclass": "accuracy", "multilabel": "accuracy", "regression": "mae"}


class MetricsHistory:
    """``metrics.jsonl``: one line per snapshot, at most ``max_lines`` (then the oldest half goes)."""

    def __init__(self, path: Path, max_lines: int = 20_000):
        self.path, self.max_lines = path, max_lines
        path.parent.mkdir(parents=True, exist_ok=True)
        self.lines = sum(1 for _ in path.open("rb")) if path.exists() else 0

    def append(self, snap: dict[str, Any]) -> None:
        row = {
            "ts": snap.get("ts"),
            "events": snap.get("events"),
            "tasks": {t: {k: v for k, v in m.items() if isinstance(v, int | float)} for t, m in snap["tasks"].items()},
            "drift": {t: d.get("alerts", 0) for t, d in (snap.get("drift") or {}).items()},
            "batch": snap.get("batch_composition") or {},
            "weights": snap.get("task_weights") or {},
            "feature_drift": (snap.get("feature_drift") or {}).get("drift_share"),
        }
        with self.path.open("ab") as f:
            f.write(orjson.dumps(row) + b"\n")
        self.lines += 1
        if self.lines > self.max_lines:
            keep = self.path.read_bytes().splitlines()[-self.max_lines // 2 :]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_bytes(b"\n".join(keep) + b"\n")
            os.replace(tmp, self.path)
            self.lines = len(keep)


def _interval(prev: dict[str, float] | None, cur: dict[str, float], metric: str) -> float | None:
    """The metric over the events between two snapshots (it is a mean: value × n is a sum)."""
    n1 = cur.get("n", 0)
    if metric not in cur:
        return None
    if prev is None or metric not in prev:
        return cur[metric] if n1 else None
    dn = n1 - prev.get("n", 0)
    if dn <= 0:
        return None
    return (cur[metric] * n1 - prev[metric] * prev["n"]) / dn


def write_report(run_dir: Path, task_kinds: dict[str, str] | None = None) -> Path:
    """Write ``<run_dir>/report.html`` from ``<run_dir>/metrics.jsonl``; its path."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = [orjson.loads(line) for line in (run_dir / "metrics.jsonl").read_bytes().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no snapshot")
    tasks = list(rows[-1]["tasks"])
    kinds = task_kinds or {t: ("regression" if "mae" in rows[-1]["tasks"][t] else "binary") for t in tasks}
    t0 = rows[0]["ts"]
    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.07,
        subplot_titles=(
            "prequential metric per interval (accuracy; regression: MAE) — ✕ drift alert",
            "share of the mini-batch per task",
            "loss weight per task",
        ),
    )
    for task in tasks:
        metric = PLOTTED.get(kinds.get(task, "binary"), "accuracy")
        xs, ys, marks = [], [], []
        prev, prev_drift = None, 0
        for r in rows:
            cur = r["tasks"].get(task)
            if cur is None:
                continue
            v = _interval(prev, cur, metric)
            prev = cur
            if v is None:
                continue
            xs.append(r["ts"] - t0)
            ys.append(v)
            drift = r["drift"].get(task, 0)
            if drift > prev_drift:
                marks.append((r["ts"] - t0, v))
            prev_drift = drift
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"{task} {metric}", legendgroup=task), row=1, col=1)
        if marks:
            fig.add_trace(
                go.Scatter(
                    x=[m[0] for m in marks],
                    y=[m[1] for m in marks],
                    mode="markers",
                    marker={"symbol": "x", "size": 12},
                    name=f"{task} drift",
                    legendgroup=task,
                ),
                row=1,
                col=1,
            )
        share = [(r["ts"] - t0, r["batch"].get(task, 0) / max(1, sum(r["batch"].values()))) for r in rows if r["batch"]]
        weight = [(r["ts"] - t0, r["weights"][task]) for r in rows if task in r["weights"]]
        for row, points, style in ((2, share, {"stackgroup": "share"}), (3, weight, {"mode": "lines"})):
            xs_, ys_ = [p[0] for p in points], [p[1] for p in points]
            trace = go.Scatter(x=xs_, y=ys_, name=task, legendgroup=task, showlegend=False, **style)
            fig.add_trace(trace, row=row, col=1)
    fig.update_xaxes(title_text="seconds since the first snapshot", row=3, col=1)
    fig.update_layout(height=950, title=f"stream_mtl run: {run_dir.name} — {rows[-1]['events']:,} events")
    links = "".join(
        f'<li><a href="reports/{p.name}">{p.name}</a></li>' for p in sorted((run_dir / "reports").glob("drift-*.html"))
    )
    body = fig.to_html(include_plotlyjs=True, full_html=False)
    html = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>stream_mtl {run_dir.name}</title></head><body>"
        f"{body}<h3>Feature-drift reports (evidently)</h3><ul>{links or '<li>none yet</li>'}</ul></body></html>"
    )
    out = run_dir / "report.html"
    out.write_text(html, encoding="utf-8")
    return out
