"""The Yeast topology on the real embedded broker, through a real ``stream-mtl worker`` process.

One run: all 2,417 Yeast events plus malformed records mixed in. Every valid event gets a
prediction for every one of the 14 tasks; exactly the malformed records reach the DLQ, with
their original bytes and a reason.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from stream_mtl.codec import PredictionBatch
from stream_mtl.produce import malformed_payloads, produce_events
from stream_mtl.topics import TopicNames, create_topics
from stream_mtl.topology import load_producer, load_topology
from tests.integration.kafka_helpers import read_topic

pytestmark = pytest.mark.integration

TOPO = load_topology("yeast")
N_EVENTS = 2417
N_BAD = 25


@pytest.fixture(scope="module")
def yeast_run(broker, tmp_path_factory):
    from tests.conftest import WorkerProcess

    names = TopicNames(TOPO, "yeastit")
    asyncio.run(create_topics(broker.bootstrap, names.all()))
    worker = WorkerProcess("yeast", broker, tmp_path_factory.mktemp("w") / "worker.log", app_id=names.app_id)
    report = asyncio.run(produce_events(broker.bootstrap, names, load_producer("yeast")(), malformed=N_BAD))
    try:
        yield names, report, worker
    finally:
        code = worker.stop()
        assert code == 0, worker.log()[-3000:]


def _pairs(records: list) -> set[tuple[str, str]]:
    out = set()
    for r in records:
        for row in PredictionBatch.from_json(r.value).rows():
            out.add((row["id"], row["task"]))
    return out


def test_every_event_is_predicted_for_every_task(broker, yeast_run) -> None:
    names, report, worker = yeast_run
    assert report.events == N_EVENTS
    want = N_EVENTS * len(TOPO.tasks)
    recs = asyncio.run(
        read_topic(broker.bootstrap, names.predictions, lambda rs: len(_pairs(rs)) >= want, 180, worker.alive)
    )
    pairs = _pairs(recs)
    assert len(pairs) == want
    assert {eid for eid, _ in pairs} == {f"yeast-{i}" for i in range(N_EVENTS)}
    assert {task for _, task in pairs} == {t.name for t in TOPO.tasks}
    row = next(PredictionBatch.from_json(recs[-1].value).rows())
    assert set(row) >= {"id", "task", "prediction", "model_version"}


def test_malformed_records_reach_the_dlq_with_reasons(broker, yeast_run) -> None:
    names, report, worker = yeast_run
    recs = asyncio.run(read_topic(broker.bootstrap, names.dlq, lambda rs: len(rs) >= N_BAD, 120, worker.alive))
    assert len(recs) == N_BAD
    assert sorted(r.key for r in recs) == sorted(report.malformed_keys)
    assert sorted(r.value for r in recs) == sorted(malformed_payloads(TOPO, N_BAD))  # original bytes
    for r in recs:
        h = {k: v.decode() for k, v in r.headers}
        assert h["stage"] in ("ingest", "validate") and h["error_class"] and h["reason"]
        assert h["source_topic"] == names.source and int(h["source_offset"]) >= 0


def test_worker_reports_what_it_did(broker, yeast_run) -> None:
    names, _report, worker = yeast_run

    def complete(rs: list) -> bool:
        if not rs:
            return False
        last = orjson.loads(rs[-1].value)
        return last["pending"] == 0 and all(n == N_EVENTS for n in last["predicted"].values())

    recs = asyncio.run(read_topic(broker.bootstrap, names.metrics, complete, 120, worker.alive))
    snap = orjson.loads(recs[-1].value)
    assert snap["events"] == N_EVENTS and snap["dlq"] == N_BAD and snap["records"] == N_EVENTS + N_BAD
    assert all(v["n"] == N_EVENTS for v in snap["tasks"].values())
    assert snap["examples_learned"] == N_EVENTS * len(TOPO.tasks)
    assert snap["micro_f1"] > 0.5  # learns: River's best prequential baseline is ~0.61
    assert snap["first_event_at"] - snap["started_at"] < 10
