"""Chaos: a worker SIGKILLed at random points ten times while a producer runs, restarted each time.

Then three proofs, the way Faust's own consistency tests check a stream processor:
every produced event id has a prediction (each task it is labelled for, or that takes late
labels) and every malformed record is in the dead-letter topic; duplicates are bounded by what
the killed workers predicted in their last commit interval; and the shared-feature table read
back from its changelog equals a rebuild from the source topic (the feature state is
exactly-once although delivery is at-least-once).
"""

from __future__ import annotations

import asyncio
import math
import random
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest

from stream_mtl.changelog import read_latest
from stream_mtl.codec import PredictionBatch
from stream_mtl.pipeline import IngestStage
from stream_mtl.produce import produce_events
from stream_mtl.settings import Settings
from stream_mtl.synthetic import SyntheticStream
from stream_mtl.topics import TopicNames, create_topics
from stream_mtl.topology import Topology, load_topology
from tests.integration.kafka_helpers import expected_predictions, read_topic

pytestmark = pytest.mark.integration

TOPOLOGY = str(Path(__file__).parent / "topologies" / "synthetic_p2")
N = 40_000
CHUNK = 1_000
KILLS = 10
MALFORMED_PER_CHUNK = 2


def test_ten_random_sigkills_lose_nothing(broker, start_worker) -> None:
    topo = load_topology(TOPOLOGY)
    names = TopicNames(topo, f"chaos{uuid.uuid4().hex[:6]}")
    asyncio.run(create_topics(broker.bootstrap, names.all()))
    items = list(SyntheticStream.default().events(N))
    events = [e for e in items if "_label" not in e]
    expected = expected_predictions(topo, events)

    # the producer sends a chunk at a time until the kills are done, then the rest
    kills_done = threading.Event()
    sent = {"malformed": 0}

    def produce() -> None:
        for i in range(0, len(items), CHUNK):
            rep = asyncio.run(
                produce_events(broker.bootstrap, names, items[i : i + CHUNK], malformed=MALFORMED_PER_CHUNK, seed=i)
            )
            sent["malformed"] += rep.malformed
            kills_done.wait(1.5)  # paced while the kills go on, then the rest at once

    producer = threading.Thread(target=produce)
    producer.start()
    rng = random.Random(20261204)
    kills: list[float] = []
    worker = start_worker(TOPOLOGY, app_id=names.app_id)
    while len(kills) < KILLS:
        if len(kills) % 2:  # anywhere in start-up: joining the groups, restoring state, the first polls
            time.sleep(rng.uniform(0.3, 4.0))
        else:  # mid-stream: once this worker has predicted something, at a random moment after
            _wait_for_predictions(broker.bootstrap, names, worker)
            time.sleep(rng.uniform(0.0, 1.5))
        assert worker.alive(), worker.log()[-3000:]
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(10)
        kills.append(time.time())
        assert producer.is_alive() or len(kills) == KILLS, "the producer must still be running during the kills"
        worker = start_worker(TOPOLOGY, app_id=names.app_id)
    kills_done.set()
    producer.join(120)

    # 1. every event predicted for each of its tasks, every malformed record dead-lettered
    counts: Counter[tuple[str, str]] = Counter()
    stamps: list[tuple[int, int]] = []  # (message timestamp ms, rows)

    def complete(rs: list) -> bool:
        for r in rs[len(stamps) :]:  # the records not counted yet
            rows = list(PredictionBatch.from_json(r.value).rows())
            counts.update((row["id"], row["task"]) for row in rows)
            stamps.append((r.timestamp, len(rows)))
        return expected <= counts.keys()

    try:
        asyncio.run(read_topic(broker.bootstrap, names.predictions, complete, 150, worker.alive))
    except TimeoutError as exc:  # say where the stream stands
        snaps = asyncio.run(read_topic(broker.bootstrap, names.metrics, lambda rs: bool(rs), 10))
        last = orjson.loads(snaps[-1].value)
        missing = Counter(task for _, task in expected - counts.keys())
        where = {k: last.get(k) for k in ("events", "predicted", "lag", "steps")}
        raise AssertionError(f"missing predictions per task {dict(missing)}; last snapshot {where}") from exc
    assert set(counts) == expected
    dead = asyncio.run(
        read_topic(broker.bootstrap, names.dlq, lambda rs: _distinct_dead(rs) >= sent["malformed"], 60, worker.alive)
    )
    assert _distinct_dead(dead) == sent["malformed"] == MALFORMED_PER_CHUNK * math.ceil(len(items) / CHUNK)

    # 2. duplicates: at most what the killed workers predicted in their last commit interval (+ the poll in flight)
    duplicates = sum(counts.values()) - len(expected)
    window_ms = (Settings().commit_interval + 1.5) * 1000
    bound = sum(n for ts, n in stamps for k in kills if k * 1000 - window_ms <= ts <= k * 1000 + 100)
    print(f"chaos: {KILLS} kills, {len(expected)} predictions expected, {duplicates} duplicates (bound {bound})")
    assert duplicates <= bound, (duplicates, bound)

    # 3. the feature table (its changelog, latest value per key) equals a rebuild from the source topic
    rebuilt = asyncio.run(_rebuild_features(broker.bootstrap, names, topo, len(events) + sent["malformed"]))
    deadline = time.monotonic() + 30
    while True:
        latest = asyncio.run(read_latest(broker.bootstrap, names.feature_changelog))
        table = {k: orjson.loads(v) for k, v in latest.items() if v is not None}
        if all(table.get(k, {}).get("n") == v["n"] for k, v in rebuilt.items()) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert table.keys() == rebuilt.keys()
    for key, want in rebuilt.items():
        got = table[key]
        assert (got["n"], got["o"]) == (want["n"], want["o"]), key
        np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got["m2"], want["m2"], rtol=1e-9)


def _wait_for_predictions(bootstrap: str, names: TopicNames, worker, timeout: float = 30) -> None:
    """Until the worker's own metrics snapshot says it has predicted events."""
    since = time.time()

    def predicting(rs: list) -> bool:
        snaps = (orjson.loads(r.value) for r in rs if r.timestamp >= since * 1000)
        return any(sum(s["predicted"].values()) > 0 for s in snaps)

    asyncio.run(read_topic(bootstrap, names.metrics, predicting, timeout, worker.alive))


def _distinct_dead(records: list) -> int:
    """Dead letters counted once per source position (a replayed poll may dead-letter a record twice)."""
    pos = set()
    for r in records:
        h = dict(r.headers)
        pos.add((h["source_topic"], h["source_partition"], h["source_offset"]))
    return len(pos)


async def _rebuild_features(bootstrap: str, names: TopicNames, topo: Topology, records: int) -> dict[str, dict]:
    """The feature state computed afresh from every record of the source topic, poll-sized batches."""
    recs = await read_topic(bootstrap, names.source, lambda rs: len(rs) >= records, 60)
    by_part: dict[int, list] = {}
    for r in recs:
        by_part.setdefault(r.partition, []).append(r)
    stage = IngestStage(topo, names.sources, names.labels)
    state: dict[str, dict] = {}
    for recs_p in by_part.values():
        recs_p.sort(key=lambda r: r.offset)
        for i in range(0, len(recs_p), topo.ingest_batch):
            out = stage.process({0: recs_p[i : i + topo.ingest_batch]})
            state.update({k: v for k, v in out.table_updates.items() if v is not None})
    return state
