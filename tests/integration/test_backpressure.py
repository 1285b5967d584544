"""Backpressure: a trainer far slower than ingest keeps the worker's memory bounded.

The trainer of ``topologies/slow_trainer`` takes ~100 ms a step (its losses sleep), ~15× slower
than ingest. Ingest reads the whole source and writes the task frames; the backlog then waits in
Kafka (the task topics' consumer lag grows), not in the worker: Faust buffers at most
``STREAM_BUFFER_FRAMES`` frames per stream and the trainer's buffers are bounded. The worker's RSS
(plus its trainer process's) is sampled while the backlog grows and must stay flat.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from pathlib import Path

import orjson
import pytest

from stream_mtl.produce import produce_events
from stream_mtl.synthetic import SyntheticStream
from stream_mtl.topics import TopicNames, create_topics
from stream_mtl.topology import load_topology
from tests.integration.kafka_helpers import read_topic

pytestmark = pytest.mark.integration

TOPOLOGY = str(Path(__file__).parent / "topologies" / "slow_trainer")
N = 600_000
CHUNK = 50_000
#: RSS growth allowed while the backlog grows by ~500k events: ~1,000 task frames, ~130 MB if they were held
MAX_GROWTH_MIB = 40.0


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_slow_trainer_keeps_memory_bounded(broker, start_worker) -> None:
    topo = load_topology(TOPOLOGY)
    names = TopicNames(topo, f"bp{uuid.uuid4().hex[:6]}")
    asyncio.run(create_topics(broker.bootstrap, names.all()))
    worker = start_worker(TOPOLOGY, app_id=names.app_id)

    def produce() -> None:
        gen = SyntheticStream.default().events(N)
        while chunk := list(itertools.islice(gen, CHUNK)):
            asyncio.run(produce_events(broker.bootstrap, names, chunk))

    producer = threading.Thread(target=produce)
    producer.start()
    follower = _Follower(broker.bootstrap, names.metrics, worker)
    snap = follower.wait(lambda s: s["events"] >= 100_000, 120)
    pids = [worker.proc.pid, snap["trainer_pid"]]
    base = sum(_rss_mib(p) for p in pids)
    samples: list[tuple[int, float, int]] = []  # (events ingested, RSS MiB, task-topic lag in frames beyond Faust)
    done_at = None
    while done_at is None or time.monotonic() - done_at < 10:
        snap = follower.wait(lambda s, n=len(follower.snaps): len(follower.snaps) > n, 30)
        lag = sum(v for k, v in snap["lag"].items() if ".task." in k)
        samples.append((snap["events"], sum(_rss_mib(p) for p in pids), lag))
        if done_at is None and snap["events"] >= N:
            done_at = time.monotonic()
    producer.join(60)
    assert worker.alive(), worker.log()[-3000:]
    peak = max(rss for _, rss, _ in samples)
    behind = N - min(snap["predicted"].values())  # ingested, not yet through the trainer
    print(
        f"backpressure: RSS {base:.1f} MiB at 100k events, peak {peak:.1f} MiB once all {N} were ingested; "
        f"{behind} events not yet through the trainer (task-topic lag {samples[-1][2]} frames)"
    )
    # the backlog is real: over half the stream had been read and routed but not yet predicted and learned
    assert behind > N // 2, "the trainer was not slower than ingest: this test would mean nothing"
    assert peak - base < MAX_GROWTH_MIB, samples


class _Follower:
    """The worker's metrics snapshots, read incrementally from its metrics topic."""

    def __init__(self, bootstrap: str, topic: str, worker) -> None:
        self.bootstrap, self.topic, self.worker = bootstrap, topic, worker
        self.snaps: list[dict] = []

    def wait(self, cond, timeout: float) -> dict:
        def done(rs: list) -> bool:
            self.snaps = [orjson.loads(r.value) for r in rs]
            return bool(self.snaps) and cond(self.snaps[-1])

        asyncio.run(read_topic(self.bootstrap, self.topic, done, timeout, self.worker.alive))
        return self.snaps[-1]
