"""Drift detection on the hot path: river detectors on each task's prequential error stream.

The trainer scores every labelled event against the prediction made before it learned from it;
the same per-event error feeds the task's detectors (:class:`ErrorDetector`, one base class over
river's ADWIN, PageHinkley and DDM). A detection becomes an :class:`~stream_mtl.alerts.Alert` whose
id is deterministic in (app, task, detector, window): the window is the source partition and the
thousand-offset block of the batch's last event, so a replay after a crash names the same alert.
Detector state is per worker (an alert says which worker and partition saw it).

>>> import numpy as np
>>> d = ErrorDetector.make("adwin")
>>> d.update(np.zeros(2000)) is None, d.update(np.ones(300)) is not None
(True, True)
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
from river import drift as river_drift

from stream_mtl.alerts import Alert, alert_id
from stream_mtl.topology import DriftSpec, TaskSpec, Topology

__all__ = ["DriftMonitor", "ErrorDetector", "FeatureDriftMonitor"]

#: Offsets per alert window (see module doc).
WINDOW_OFFSETS = 1000
#: Alerts kept for :meth:`DriftMonitor.drain`.
MAX_UNDRAINED = 1000


class ErrorDetector:
    """A river drift detector fed one error per event; :meth:`update` returns where the error rose.

    Only a rise counts: a model that is still learning lowers its error, and ADWIN (which sees
    any change of mean) would otherwise call that a drift. PageHinkley runs in ``up`` mode; DDM
    only sees rises by construction; for ADWIN the mean of the window it keeps after a change is
    compared with the mean before it.
    """

    def __init__(self, name: str, detector: Any, rises_only: bool = True):
        self.name = name
        self.rises_only = rises_only  # an error stream; a feature's value stream alerts on any change
        self.detector = detector
        self.seen = 0
        self.detections = 0
        self._since = [0.0, 0]  # error sum and count since the last detection (ADWIN's "before")

    @classmethod
    def make(cls, kind: str, spec: DriftSpec | None = None) -> ErrorDetector:
        spec = spec or DriftSpec()
        if kind == "adwin":
            return cls(kind, river_drift.ADWIN(delta=spec.adwin_delta))
        if kind == "page_hinkley":
            return cls(kind, river_drift.PageHinkley(mode="up"))
        if kind == "ddm":
            return cls(kind, river_drift.binary.DDM())
        raise ValueError(f"unknown detector {kind!r}")

    def update(self, errors: np.ndarray) -> int | None:
        """Feed a batch of per-event errors in order; the index of the first rise detected, if any."""
        det = self.detector
        values = errors.astype(bool).tolist() if self.name == "ddm" else errors.tolist()
        hit = None
        start = 0
        while start < len(values):
            at = _first_detection(det, values, start)
            if at is None:
                break
            rose = True
            if self.name == "adwin" and self.rises_only:  # the mean ADWIN keeps after the cut vs. since the last one
                total, n = self._since
                seg = errors[start : at + 1]
                before = (total + float(seg.sum())) / max(1, n + len(seg))
                rose = det.estimation > before
            self._since = [0.0, 0]
            if rose:
                self.detections += 1
                if hit is None:
                    hit = at
            start = at + 1
        tail = errors[start:]
        self._since = [self._since[0] + float(tail.sum()), self._since[1] + len(tail)]
        self.seen += len(values)
        return hit


def _first_detection(det: Any, values: list[Any], start: int) -> int | None:
    update = det.update
    for i in range(start, len(values)):
        update(values[i])
        if det.drift_detected:
            return i
    return None


def task_errors(task: TaskSpec, y: np.ndarray, decided: np.ndarray) -> np.ndarray:
    """Per-event errors of one task: 0/1 mistakes, or the absolute error of a regression."""
    if task.kind == "regression":
        return np.abs(np.asarray(y, dtype=np.float64).reshape(-1) - np.asarray(decided, dtype=np.float64).reshape(-1))
    if task.kind == "multilabel":
        return (np.asarray(y).reshape(len(y), -1) != np.asarray(decided).reshape(len(y), -1)).any(axis=1).astype(float)
    return (np.asarray(y).reshape(-1).astype(np.float64) != np.asarray(decided).reshape(-1).astype(np.float64)).astype(
        float
    )


class DriftMonitor:
    """Every task's detectors; collects the alerts they raise until :meth:`drain`."""

    def __init__(self, topology: Topology, app: str, worker: str, clock: Callable[[], float] = time.time):
        self.app, self.worker, self.clock = app, worker, clock
        self.tasks = {t.name: t for t in topology.tasks}
        self.detectors = {t.name: [ErrorDetector.make(k, t.drift) for k in t.drift.detectors] for t in topology.tasks}
        #: raised, not yet drained (bounded: a caller that never drains keeps the newest MAX_UNDRAINED)
        self.alerts: deque[Alert] = deque(maxlen=MAX_UNDRAINED)
        self.count = {t.name: 0 for t in topology.tasks}

    def observe(
        self, task: str, y: Any, decided: Any, offsets: dict[str, list[int]] | None, ids: list[str] | None = None
    ) -> list[Alert]:
        """Score one batch's labelled rows (``ids`` theirs); the alerts it raised (also kept for :meth:`drain`)."""
        dets = self.detectors[task]
        if not dets or len(y) == 0:
            return []
        errors = task_errors(self.tasks[task], y, decided)
        raised = []
        for det in dets:
            at = det.update(errors)
            if at is None:
                continue
            self.count[task] += 1
            # late labels carry no source offsets: their window is this detector's detection count
            window = _window(offsets) or f"labels#{det.detections}"
            alert = Alert(
                id=alert_id(self.app, task, det.name, window),
                kind="drift",
                app=self.app,
                task=task,
                detector=det.name,
                worker=self.worker,
                ts=self.clock(),
                details={
                    "window": window,
                    "event_id": ids[at] if ids is not None and at < len(ids) else None,  # the error that tipped it
                    "events_seen": det.seen,
                    "batch_error": float(errors.mean()),  # this batch's error rate (or mean absolute error)
                    "estimate": float(getattr(det.detector, "estimation", float("nan"))),  # ADWIN: the recent mean
                },
            )
            raised.append(alert)
        self.alerts.extend(raised)
        return raised

    def drain(self) -> list[Alert]:
        out = list(self.alerts)
        self.alerts.clear()
        return out


def _window(offsets: dict[str, list[int]] | None) -> str:
    if not offsets:
        return ""
    src, (_first, last) = max(offsets.items())
    return f"{src}@{last // WINDOW_OFFSETS}"


class FeatureDriftMonitor:
    """ADWIN on the value stream of each selected shared-feature column (``Topology.drift_features``).

    Runs in the ingest stage, where the features are computed; any change of a column's mean
    alerts (``task`` is ``"*"``, ``details["feature"]`` names the column).

    >>> import numpy as np
    >>> from stream_mtl.synthetic import SyntheticStream, synthetic_topology
    >>> topo = synthetic_topology(SyntheticStream(n_features=2, n_binary=1, n_regression=0), drift_features=["f1"])
    >>> m = FeatureDriftMonitor(topo, "app", "w1")
    >>> x = np.zeros((4000, 2), np.float32); x[2000:, 1] = 3.0
    >>> [a.details["feature"] for a in m.observe(x, "app.events:0", 3999)]
    ['f1']
    """

    def __init__(self, topology: Topology, app: str, worker: str, clock: Callable[[], float] = time.time):
        self.app, self.worker, self.clock = app, worker, clock
        columns = topology.feature_columns()
        self.columns = {name: columns.index(name) for name in topology.drift_features}
        self.detectors = {
            name: ErrorDetector("adwin", river_drift.ADWIN(), rises_only=False) for name in topology.drift_features
        }
        self.count = dict.fromkeys(self.columns, 0)

    def observe(self, x: np.ndarray, partition: str, last_offset: int) -> list[Alert]:
        """Feed one batch of the shared feature matrix (rows in offset order); the alerts raised."""
        alerts = []
        window = f"{partition}@{last_offset // WINDOW_OFFSETS}"
        for name, col in self.columns.items():
            det = self.detectors[name]
            at = det.update(np.asarray(x[:, col], dtype=np.float64))
            if at is None:
                continue
            self.count[name] += 1
            alerts.append(
                Alert(
                    id=alert_id(self.app, "*", f"adwin:{name}", window),
                    kind="drift",
                    app=self.app,
                    task="*",
                    detector=f"adwin:{name}",
                    worker=self.worker,
                    ts=self.clock(),
                    details={"feature": name, "window": window, "estimate": float(det.detector.estimation)},
                )
            )
        return alerts
