"""Windowed evidently DataDrift reports on the shared features, off the hot path.

:class:`FeatureWindows` keeps a bounded reference window (the first ``reference`` rows the worker
computed) and a bounded current window (a ring of the last ``current`` rows). Every
``report_every_s`` :class:`ReportRunner` hands copies of both to a separate process (evidently
imports in ~2.5 s and a 5k × 16 report takes ~1 s: neither may touch the event loop or the
trainer's GIL), which runs ``Report([DataDriftPreset()])`` (evidently 0.7), saves the HTML and a
JSON summary under the reports folder, keeps the newest ``keep`` of each, and returns the drift
share and the per-column scores that become metrics. The same runs for each task's prediction
scores (one window pair per task, column ``score``).

>>> import numpy as np
>>> w = FeatureWindows(["a", "b"], reference=4, current=3)
>>> w.add(np.arange(12, dtype=np.float32).reshape(6, 2))
>>> w.reference_rows, w.current_rows
(4, 2)
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from stream_mtl.log import get_logger

log = get_logger(__name__)

__all__ = ["FeatureWindows", "ReportRunner", "run_report"]


class FeatureWindows:
    """The reference rows (the first ``reference``) and the current ones (the last ``current``), bounded."""

    def __init__(self, columns: list[str], reference: int = 5000, current: int = 1000):
        d = len(columns)
        self.columns = columns
        self.ref = np.zeros((reference, d), np.float32)
        self.cur = np.zeros((current, d), np.float32)
        self.reference_rows = 0
        self.current_rows = 0
        self._pos = 0  # next write in the ring
        self.added_since_report = 0

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        take = min(len(x), len(self.ref) - self.reference_rows)
        if take:
            self.ref[self.reference_rows : self.reference_rows + take] = x[:take]
            self.reference_rows += take
            x = x[take:]
        if not len(x):
            return
        x = x[-len(self.cur) :]
        n = len(x)
        first = min(n, len(self.cur) - self._pos)
        self.cur[self._pos : self._pos + first] = x[:first]
        self.cur[: n - first] = x[first:]
        self._pos = (self._pos + n) % len(self.cur)
        self.current_rows = min(len(self.cur), self.current_rows + n)
        self.added_since_report += n

    def ready(self) -> bool:
        """Both windows full and a whole current window of new rows since the last report."""
        return (
            self.reference_rows == len(self.ref)
            and self.current_rows == len(self.cur)
            and self.added_since_report >= len(self.cur)
        )

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of both windows (the current one in arrival order); resets the new-row count."""
        self.added_since_report = 0
        return self.ref.copy(), np.roll(self.cur, -self._pos, axis=0)


def run_report(
    ref: np.ndarray, cur: np.ndarray, columns: list[str], out_dir: str, keep: int, name: str = "features"
) -> dict[str, Any]:
    """Run evidently's DataDrift preset; save ``drift-<name>-*.html/json`` (newest ``keep`` kept); the summary.

    Runs in the report process.
    """
    import orjson
    import pandas as pd
    from evidently import Report
    from evidently.presets import DataDriftPreset

    t0 = time.time()
    snapshot = Report([DataDriftPreset()]).run(
        current_data=pd.DataFrame(cur, columns=columns), reference_data=pd.DataFrame(ref, columns=columns)
    )
    share, drifted, scores = 0.0, 0, {}
    for m in snapshot.dict()["metrics"]:
        cfg, value = m.get("config", {}), m.get("value")
        if cfg.get("type", "").endswith("DriftedColumnsCount"):
            share, drifted = float(value["share"]), int(value["count"])
        elif cfg.get("type", "").endswith("ValueDrift"):
            scores[cfg["column"]] = {
                "score": float(value),
                "method": cfg.get("method"),
                "threshold": cfg.get("threshold"),
            }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(t0)) + f"-{int(t0 * 1000) % 1000:03d}"
    html = out / f"drift-{name}-{stamp}.html"
    snapshot.save_html(str(html))
    summary = {
        "ts": t0,
        "seconds": round(time.time() - t0, 3),
        "drift_share": share,
        "drifted_columns": drifted,
        "columns": scores,
        "reference_rows": len(ref),
        "current_rows": len(cur),
        "name": name,
        "html": html.name,
    }
    (out / f"drift-{name}-{stamp}.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    for pattern in (f"drift-{name}-*.html", f"drift-{name}-*.json"):
        for old in sorted(out.glob(pattern))[:-keep]:
            old.unlink(missing_ok=True)
    return summary


class ReportRunner:
    """Runs :func:`run_report` for each window set that is due, in one spawned process, one at a time.

    ``windows`` maps a name (``features``, ``predictions-<task>``) to its :class:`FeatureWindows`;
    :attr:`last` holds the newest summary of each.
    """

    def __init__(self, windows: dict[str, FeatureWindows], out_dir: Path, every_s: float, keep: int):
        self.windows, self.out_dir, self.every_s, self.keep = windows, out_dir, every_s, keep
        self.last: dict[str, dict[str, Any]] = {}
        self.runs = 0
        self._pool: ProcessPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_at = time.monotonic()

    def maybe_start(self) -> bool:
        """Start the due reports in the background if none is running."""
        if self._task is not None and not self._task.done():
            return False
        if time.monotonic() - self._last_at < self.every_s:
            return False
        due = {name: w.take() for name, w in self.windows.items() if w.ready()}
        if not due:
            return False
        self._last_at = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run(due))
        return True

    async def _run(self, due: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        if self._pool is None:  # spawn: a clean interpreter (no forked threads), evidently imported there once
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        loop = asyncio.get_running_loop()
        for name, (ref, cur) in due.items():
            try:
                columns = self.windows[name].columns
                self.last[name] = await loop.run_in_executor(
                    self._pool, run_report, ref, cur, columns, str(self.out_dir), self.keep, name
                )
                self.runs += 1
                log.info("report.saved", file=self.last[name]["html"], drift_share=self.last[name]["drift_share"])
            except Exception as exc:  # a failed report is logged, never fatal to the worker
                log.warning("report.failed", report=name, error=f"{type(exc).__name__}: {exc}")
                if isinstance(exc, BrokenProcessPool):  # the child died: a new one next time
                    self._pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = None
                    return

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
