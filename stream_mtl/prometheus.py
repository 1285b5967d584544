"""The worker's Prometheus ``/metrics``: gauges set from each metrics snapshot.

One registry per worker (not the process-global default, so several pipelines in one test
process do not collide). :meth:`Exporter.update` maps the snapshot the worker publishes on
``<app>.metrics`` onto gauges; :meth:`Exporter.serve` starts prometheus-client's HTTP server.

>>> ex = Exporter("toy")
>>> ex.update({"events": 10, "dlq": 1, "tasks": {"t": {"accuracy": 0.5, "n": 10}}, "lag": {"toy.events": 3}})
>>> b"stream_mtl_task_metric{app=\\"toy\\",metric=\\"accuracy\\",task=\\"t\\"} 0.5" in ex.render()
True
>>> b"stream_mtl_consumer_lag{app=\\"toy\\",role=\\"all\\",topic=\\"toy.events\\"} 3.0" in ex.render()
True
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest, start_http_server

__all__ = ["Exporter"]


class Exporter:
    """Gauges of one worker; values come from :meth:`update`."""

    def __init__(self, app: str, role: str = "all"):
        self.app = app
        self.role = role  # the worker's --role: autoscaling scales each role on its own inputs' lag
        self.registry = CollectorRegistry()
        r = self.registry
        label = ["app"]
        self.events = Gauge("stream_mtl_events_total", "valid events ingested", label, registry=r)
        self.events_rate = Gauge("stream_mtl_events_per_second", "events ingested per second", label, registry=r)
        self.dlq = Gauge("stream_mtl_dead_letters_total", "records sent to the dead-letter topic", label, registry=r)
        self.loop_lag = Gauge("stream_mtl_event_loop_lag_seconds", "event-loop lag, max since last", label, registry=r)
        self.lag = Gauge(
            "stream_mtl_consumer_lag", "records behind the end, per input topic", [*label, "role", "topic"], registry=r
        )
        t = [*label, "task"]
        self.metric = Gauge("stream_mtl_task_metric", "prequential metric per task", [*t, "metric"], registry=r)
        self.loss = Gauge("stream_mtl_task_loss", "last training loss per task", t, registry=r)
        self.weight = Gauge("stream_mtl_task_loss_weight", "loss weight per task (balancer)", t, registry=r)
        self.share = Gauge("stream_mtl_task_batch_share", "share of the last mini-batch per task", t, registry=r)
        self.drift = Gauge("stream_mtl_drift_alerts_total", "drift alerts per task", t, registry=r)
        self.feature_drift = Gauge(
            "stream_mtl_feature_drift_share", "share of drifted feature columns (last report)", label, registry=r
        )
        self.column_drift = Gauge(
            "stream_mtl_feature_drift_score",
            "drift score per feature column (last report)",
            [*label, "column"],
            registry=r,
        )
        self.prediction_drift = Gauge(
            "stream_mtl_prediction_drift_score", "drift score of each task's prediction scores (last report)", t,
            registry=r,
        )  # fmt: skip
        self._last: tuple[float, int] | None = None

    def update(self, snap: dict[str, Any]) -> None:
        a = self.app
        events = int(snap.get("events") or 0)
        now = time.monotonic()
        if self._last is not None and now > self._last[0]:
            self.events_rate.labels(a).set((events - self._last[1]) / (now - self._last[0]))
        self._last = (now, events)
        self.events.labels(a).set(events)
        self.dlq.labels(a).set(int(snap.get("dlq") or 0))
        self.loop_lag.labels(a).set(float(snap.get("event_loop_lag_ms", {}).get("max", 0.0)) / 1e3)
        self.lag.clear()  # a topic this worker no longer reads must not keep its last lag (autoscaling reads it)
        for topic, n in (snap.get("lag") or {}).items():
            self.lag.labels(a, self.role, topic).set(n)
        for task, values in (snap.get("tasks") or {}).items():
            for name, v in values.items():
                if isinstance(v, int | float) and v == v:
                    self.metric.labels(a, task, name).set(v)
        for task, v in (snap.get("losses") or {}).items():
            self.loss.labels(a, task).set(v)
        for task, v in (snap.get("task_weights") or {}).items():
            self.weight.labels(a, task).set(v)
        comp = snap.get("batch_composition") or {}
        total = sum(comp.values()) or 1
        for task, n in comp.items():
            self.share.labels(a, task).set(n / total)
        for task, d in (snap.get("drift") or {}).items():
            self.drift.labels(a, task).set(d.get("alerts", 0))
        for task, d in (snap.get("prediction_drift") or {}).items():
            self.prediction_drift.labels(a, task).set(d["score"])
        report = snap.get("feature_drift")
        if report:
            self.feature_drift.labels(a).set(report["drift_share"])
            self.column_drift.clear()  # the top columns change from report to report
            for col, score in report["columns"].items():
                self.column_drift.labels(a, col).set(score)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` (0: a free port) in a thread; the port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])
