"""The in-process topology driver: the agents' own functions, deterministic, with a clock of its own."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from stream_mtl import DriftSpec
from stream_mtl.codec import decode_batch
from stream_mtl.produce import malformed_payloads
from stream_mtl.synthetic import SyntheticStream, synthetic_topology
from stream_mtl.testing import START_TIME, Record, TopologyDriver

# two binary tasks and a regression task r0 whose labels are sparse and half of them late (TTL 60 s)
GEN = SyntheticStream(
    n_features=4, n_binary=2, n_regression=1, missing={"r0": 0.3}, late={"r0": 0.5}, late_after=30, seed=4
)
TOPO = synthetic_topology(GEN, name="drv", batch_size=16, ingest_batch=50)
EVENTS = list(GEN.events(200))  # events, with {"_label": …} items among them


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    n = torch.get_num_threads()  # tiny models: one thread is faster
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def events_only() -> list[dict[str, Any]]:
    return [e for e in EVENTS if "_label" not in e]


def test_every_labelled_event_is_predicted_once_and_learned() -> None:
    with TopologyDriver(TOPO) as driver:
        driver.pipe(EVENTS)
        preds = driver.predictions()
        batches = driver.batches()
        snap = driver.metrics()
    evs = events_only()
    for task in ("y0", "y1"):
        assert sorted(r["id"] for r in preds if r["task"] == task) == sorted(e["id"] for e in evs)
    # r0 takes late labels: every event is predicted on arrival (most without their label yet)
    assert sorted(r["id"] for r in preds if r["task"] == "r0") == sorted(e["id"] for e in evs)
    assert {r["model_version"].split("-")[0] for r in preds} == {TOPO.spec_hash()[:8]}
    assert preds[0]["model_version"].endswith("-0")  # the first poll is predicted before anything learned
    # every labelled row was learned: on the event (y0, y1, a share of r0) or joined later (the late r0 labels)
    on_event = sum(1 for e in evs if e.get("r0") is not None)
    late = sum(1 for e in EVENTS if "_label" in e)
    learned = {t: sum(b.get(t, 0) for b in batches) for t in ("y0", "y1", "r0")}
    assert learned == {"y0": len(evs), "y1": len(evs), "r0": on_event + late}
    assert snap["labels"]["r0"]["joined"] == late and late > 10
    assert all(0 < sum(b.values()) <= TOPO.batch_size for b in batches)
    assert snap["steps"] == len(batches) and snap["examples_learned"] == sum(map(sum, map(dict.values, batches)))
    assert snap["ingest"] == {"records": len(evs), "events": len(evs), "dlq": 0, "labels": late}


def test_a_poll_that_carries_late_labels_trains_when_its_round_is_complete() -> None:
    """The frames of one poll are one round; its label frames count towards it (it used to never complete)."""
    first_poll = EVENTS[: TOPO.ingest_batch]
    assert any("_label" in e for e in first_poll)
    with TopologyDriver(TOPO) as driver:
        driver.pipe(EVENTS)
        preds = driver.predictions()
    second_poll = {e["id"] for e in EVENTS[TOPO.ingest_batch : 2 * TOPO.ingest_batch] if "_label" not in e}
    assert second_poll and all(not r["model_version"].endswith("-0") for r in preds if r["id"] in second_poll)


def test_malformed_records_and_labels_go_to_the_dlq_with_a_reason() -> None:
    bad = malformed_payloads(TOPO, 5)
    evs = events_only()[:100]
    with TopologyDriver(TOPO) as driver:
        driver.pipe([*evs[:50], *bad, *evs[50:]])
        driver.pipe_labels([{"id": evs[0]["id"], "task": "r0", "value": "high"}, b"not json"])
        dead = driver.dlq()
        preds = driver.predictions()
    assert [d.value for d in dead[:5]] == bad  # the original bytes
    assert all(d.stage in ("ingest", "validate") and d.reason and d.topic == "drv.events" for d in dead[:5])
    assert {d.offset for d in dead[:5]} == set(range(50, 55))  # their place in the source partition
    labels = dead[5:]
    assert [d.stage for d in labels] == ["labels", "labels"] and all(d.topic == "drv.labels" for d in labels)
    assert "must be a number" in labels[0].reason and "invalid JSON" in labels[1].reason
    assert len([r for r in preds if r["task"] == "y0"]) == 100  # the good events around them went on


def test_late_labels_join_within_the_ttl_and_expire_after_advance_time() -> None:
    evs = [{k: v for k, v in e.items() if k != "r0"} for e in events_only()[:40]]  # r0 labels only come late
    with TopologyDriver(TOPO) as driver:
        driver.pipe(evs)
        steps = driver.metrics()["steps"]
        driver.advance_time(30)  # within r0's 60 s TTL
        driver.pipe_labels([{"id": e["id"], "task": "r0", "value": 1.5} for e in evs[:10]])
        assert driver.metrics()["labels"]["r0"]["joined"] == 10
        assert driver.metrics()["steps"] > steps  # a quiet stream trains what the joined labels buffered
        driver.advance_time(31)  # past the TTL: the sweep expires the rows still waiting
        assert driver.metrics()["labels"]["r0"]["unlabelled_expired"] == 30
        driver.pipe_labels(
            [{"id": evs[20]["id"], "task": "r0", "value": 2.0}, {"id": "ghost", "task": "r0", "value": 1}]
        )
        assert driver.expired_labels() == []  # they wait (bounded, TTL) for an event that may still come
        driver.pipe_labels([{"id": evs[0]["id"], "task": "r0", "value": 1.5}])  # joined already: refused at once
        assert [(e["id"], e["reason"]) for e in driver.expired_labels()] == [(evs[0]["id"], "duplicate")]
        driver.advance_time(61)
        expired = [(e["id"], e["reason"]) for e in driver.expired_labels()[1:]]
    assert sorted(expired) == sorted([(evs[20]["id"], "unknown_event"), ("ghost", "unknown_event")])


def test_two_drivers_with_the_same_seed_agree_even_interleaved() -> None:
    first, second, other = TopologyDriver(TOPO, seed=7), TopologyDriver(TOPO, seed=7), TopologyDriver(TOPO, seed=8)
    try:
        for start in range(0, len(EVENTS), 60):  # alternate: each driver keeps its own torch generator state
            for d in (first, other, second):
                d.pipe(EVENTS[start : start + 60])
        assert first.predictions() == second.predictions()
        assert first.batches() == second.batches() and first.losses() == second.losses()
        assert [r["score"] for r in first.predictions()] != [r["score"] for r in other.predictions()]
    finally:
        for d in (first, second, other):
            d.close()


def test_an_own_trainer_task_trains_in_a_model_of_its_own() -> None:
    """As a ``--role task:y1`` worker does: its own session, model version, batches and round count."""
    topo = TOPO.model_copy(update={"tasks": [t.model_copy(update={"own_trainer": t.name == "y1"}) for t in TOPO.tasks]})
    with TopologyDriver(topo) as driver:
        driver.pipe(EVENTS)
        preds, batches = driver.predictions(), driver.batches()
        own = driver.metrics("y1")
        assert list(driver.sessions) == ["", "y1"] and driver.trainer("y1") is not driver.trainer("y0")
        assert set(driver.trainer("y1").model.heads) == {"y1"} and "y1" not in driver.trainer().model.heads
        assert set(driver.metrics()["tasks"]) == {"y0", "r0"} and set(own["tasks"]) == {"y1"}
    versions = {r["task"]: r["model_version"].split("-")[0] for r in preds}
    assert versions["y1"] == topo.restricted_to(["y1"]).spec_hash()[:8] != versions["y0"]
    assert all(set(b) == {"y1"} or "y1" not in b for b in batches)
    # each trainer completes its own rounds: the second poll is predicted by models that learned from the first
    second_poll = {e["id"] for e in EVENTS[TOPO.ingest_batch : 2 * TOPO.ingest_batch] if "_label" not in e}
    assert all(not r["model_version"].endswith("-0") for r in preds if r["id"] in second_poll)
    assert sorted(r["id"] for r in preds if r["task"] == "y1") == sorted(e["id"] for e in events_only())


def test_records_are_partitioned_by_key_like_kafka() -> None:
    topo = synthetic_topology(GEN, name="parts", partitions=3, ingest_batch=1000)
    with TopologyDriver(topo) as driver:
        recs = [driver._record(e, None) for e in events_only()[:60]]
        label = driver._record({"_label": {"id": recs[5].key.decode(), "task": "r0", "value": 1.0}}, None)
    assert all(isinstance(r, Record) for r in recs)
    assert {r.partition for r in recs} == {0, 1, 2}
    for p in range(3):  # offsets count per partition
        assert [r.offset for r in recs if r.partition == p] == list(range(sum(r.partition == p for r in recs)))
    assert label.topic == "parts.labels" and label.partition == recs[5].partition  # an event and its label meet


def test_labels_need_a_task_that_takes_them() -> None:
    topo = synthetic_topology(SyntheticStream(n_features=2, n_binary=1, n_regression=0), name="nolate")
    with TopologyDriver(topo) as driver, pytest.raises(ValueError, match="takes late labels"):
        driver.pipe_labels([{"id": "e1", "task": "y0", "value": True}])


def test_the_faust_ingest_service_sends_the_frames_the_driver_trains_on(tmp_path) -> None:
    """Not a second implementation: the app's ingest step and the driver produce the same task frames."""
    from stream_mtl.app import Pipeline
    from stream_mtl.settings import Settings

    pipe = Pipeline(TOPO, Settings(broker="kafka://127.0.0.1:1", role="ingest", data_dir=tmp_path, report_every_s=0))
    sent: list[dict[str, Any]] = []

    def done() -> asyncio.Future[None]:
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    async def capture(**kwargs: Any) -> asyncio.Future[None]:
        sent.append(kwargs)
        return done()

    for topic in pipe.task_topics.values():
        topic.send = capture
    pipe.dlq_topic.send = capture
    pipe.features.send_changelog = lambda *a, **k: done()
    batch = [*events_only()[:50], b"{broken"]
    records = [
        Record(
            "drv.events",
            0,
            i,
            None if isinstance(e, bytes) else e["id"].encode(),
            e if isinstance(e, bytes) else orjson.dumps(e),
        )
        for i, e in enumerate(batch)
    ]
    try:
        asyncio.run(pipe._ingest_batch({("drv.events", 0): records}, 1))
        with TopologyDriver(TOPO) as driver:
            driver.pipe(batch)
            ours = driver.frames()
            dead = driver.dlq()
    finally:
        pipe.close()
    theirs = [decode_batch(s["value"]) for s in sent if s.get("headers") is None]
    assert [(b.task, b.ids, b.y, b.offsets, b.round_size) for b in theirs] == [
        (b.task, b.ids, b.y, b.offsets, b.round_size) for b in ours
    ]
    assert all(np.array_equal(a.x, b.x) for a, b in zip(theirs, ours, strict=True))
    assert [s["value"] for s in sent if s.get("headers")] == [d.value for d in dead] == [b"{broken"]


def test_drift_alerts_and_actions_carry_the_drivers_clock() -> None:
    gen = SyntheticStream(n_features=4, n_binary=1, n_regression=0, drift_at=1500, noise=0.1, seed=5)
    base = synthetic_topology(gen, name="drifty", batch_size=32, ingest_batch=100)
    spec = DriftSpec(actions=["boost_sampling"], cooldown_s=30.0)
    topo = base.model_copy(update={"tasks": [t.model_copy(update={"drift": spec}) for t in base.tasks]})
    events = list(gen.events(3000))
    with TopologyDriver(topo) as driver:
        for start in range(0, len(events), 100):  # 100 events a second
            driver.pipe(events[start : start + 100])
            driver.advance_time(1.0)
        alerts = driver.alerts()
    assert [(a.kind, a.task) for a in alerts] == [("drift", "y0"), ("action", "y0")]
    drift, action = alerts
    assert int(drift.details["event_id"].removeprefix("syn-")) >= 1500  # after the concept changed
    assert drift.ts == action.ts == START_TIME + 15  # the poll of events 1500–1599, 15 s into the run
    assert action.details["action"] == "boost_sampling" and action.details["drift_alert"] == drift.id
