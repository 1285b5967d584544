"""Drift → alert → signed webhook → action, end to end on the embedded broker, across a worker restart.

The drift topology's concept changes at event ``DRIFT_AT``. A receiver on loopback refuses every
delivery (503) while the first worker runs, so the alerts wait in the outbox; that worker is
stopped and a second one (same app id) recovers the outbox from its changelog. The receiver then
answers 503 once more per alert and accepts the next attempt: every alert arrives exactly once,
signed, with the same webhook-id on every attempt.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections import Counter

import httpx
import orjson
import pytest
from aiohttp import web

from stream_mtl.alerts import verify
from stream_mtl.produce import produce_events
from stream_mtl.topics import TopicNames, create_topics
from stream_mtl.topology import load_producer, load_topology
from tests.integration.kafka_helpers import read_topic
from topologies.drift.topology import DRIFT_AT

pytestmark = pytest.mark.integration
SECRET = "whsec_" + base64.b64encode(b"integration-secret-integration-!").decode()


class Receiver:
    """An HTTP receiver on loopback in its own thread: 503 while ``down``, then 503 once per id, then verify."""

    def __init__(self) -> None:
        self.down = True
        self.attempts: Counter[str] = Counter()
        self.accepted: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def handle(request: web.Request) -> web.Response:
            wid = request.headers["webhook-id"]
            self.attempts[wid] += 1
            if self.down or self.attempts[wid] == 1 or wid in self.refused_once:
                if not self.down:
                    self.refused_once.discard(wid)
                return web.Response(status=503)
            self.accepted.append(verify(request.headers, await request.read(), SECRET))
            return web.json_response({"ok": True})

        self.refused_once: set[str] = set()
        app = web.Application()
        app.router.add_post("/hook", handle)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"  # type: ignore[union-attr]
        self.ready.set()
        self.loop.run_forever()

    def come_up(self) -> None:
        """From now on: one more 503 for each id already tried, then accept."""
        self.refused_once = set(self.attempts)
        self.down = False


def test_a_drift_alerts_acts_and_reaches_the_webhook_once_across_a_restart(
    broker, start_worker, monkeypatch, tmp_path
) -> None:
    receiver = Receiver()
    monkeypatch.setenv("STREAM_MTL_WEBHOOK_URLS", orjson.dumps([receiver.url]).decode())
    monkeypatch.setenv("STREAM_MTL_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("STREAM_MTL_WEBHOOK_ALLOW_PRIVATE", "1")
    monkeypatch.setenv("STREAM_MTL_METRICS_PORT", "0")  # Prometheus /metrics on a free port
    monkeypatch.setenv("STREAM_MTL_REPORT_EVERY_S", "1")  # evidently feature-drift reports
    topo = load_topology("drift")
    names = TopicNames(topo, "drifty")
    asyncio.run(create_topics(broker.bootstrap, names.all()))
    events = list(load_producer("drift")())
    asyncio.run(produce_events(broker.bootstrap, names, events))

    first = start_worker("drift", app_id=names.app_id)

    def drifts_of_every_task(rs: list) -> bool:
        return {orjson.loads(r.value)["task"] for r in rs if orjson.loads(r.value)["kind"] == "drift"} >= {
            t.name for t in topo.tasks
        }

    recs = asyncio.run(read_topic(broker.bootstrap, names.alerts, drifts_of_every_task, 120, first.alive))
    alerts = [orjson.loads(r.value) for r in recs]
    drifts = [a for a in alerts if a["kind"] == "drift"]
    actions = [a for a in alerts if a["kind"] == "action"]
    # each task's first alert after the drift point names an event less than 500 events past it
    for task in (t.name for t in topo.tasks):
        after = [a for a in drifts if a["task"] == task and int(a["details"]["event_id"].split("-")[1]) >= DRIFT_AT]
        assert after, (task, [a["details"] for a in drifts if a["task"] == task])
        assert int(after[0]["details"]["event_id"].split("-")[1]) - DRIFT_AT < 500, after[0]["details"]
    # the declared actions ran and were recorded, pointing at their drift alert
    assert {a["details"]["action"] for a in actions} == {"boost_sampling", "raise_lr"}
    assert {a["details"]["drift_alert"] for a in actions} <= {a["id"] for a in drifts}

    # Prometheus: the worker's /metrics counts the drift alerts and the consumer lag per input topic
    snaps = asyncio.run(read_topic(broker.bootstrap, names.metrics, lambda rs: bool(rs), 30, first.alive))
    port = orjson.loads(snaps[-1].value)["metrics_port"]
    deadline = time.monotonic() + 20
    while True:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        if 'stream_mtl_drift_alerts_total{app="drifty",task="y0"} 1' in text or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert 'stream_mtl_drift_alerts_total{app="drifty",task="y0"}' in text
    assert 'stream_mtl_consumer_lag{app="drifty",role="all",topic="drifty.events"}' in text
    assert 'stream_mtl_task_metric{app="drifty",metric="accuracy",task="y1"}' in text

    # evidently: a DataDrift report of the shared features ran in its own process; its share is a metric
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and 'stream_mtl_feature_drift_share{app="drifty"}' not in text:
        time.sleep(1)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'stream_mtl_feature_drift_share{app="drifty"}' in text
    reports = tmp_path / "data" / "drifty" / "reports"
    assert 1 <= len(list(reports.glob("drift-features-*.html"))) <= 5
    deadline = time.monotonic() + 30  # and one per task on its prediction scores
    while time.monotonic() < deadline and not all(
        reports.glob(f"drift-predictions-{t.name}-*.json") for t in topo.tasks
    ):
        time.sleep(0.5)
    assert all(list(reports.glob(f"drift-predictions-{t.name}-*.json")) for t in topo.tasks)

    time.sleep(2)  # the receiver has refused some attempts by now
    assert receiver.attempts and not receiver.accepted
    assert first.stop() == 0  # SIGTERM: a clean stop with alerts still owed

    receiver.come_up()
    second = start_worker("drift", app_id=names.app_id)
    owed = {a["id"] for a in alerts if a["kind"] in ("drift", "action")}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not owed <= {a["id"] for a in receiver.accepted}:
        assert second.alive(), second.log()[-3000:]
        time.sleep(0.5)
    got = Counter(a["id"] for a in receiver.accepted)
    assert owed <= set(got), owed - set(got)
    assert max(got.values()) == 1  # exactly one accepted delivery per alert id
    assert all(receiver.attempts[i] >= 2 for i in owed)  # refused first, retried under the same webhook-id
