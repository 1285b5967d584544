"""Distributed training on the broker: two trainer workers (DDP, gloo) train one model next to an ingest worker.

Each trainer reads its share of the task partitions (the Faust group splits them); their trainer
processes step in lockstep, so after the stream both hold the very same training state.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path

import orjson
import pytest

from stream_mtl.codec import PredictionBatch
from stream_mtl.produce import produce_events
from stream_mtl.synthetic import SyntheticStream
from stream_mtl.topics import TopicNames, create_topics
from stream_mtl.topology import load_topology
from tests.integration.kafka_helpers import expected_predictions, read_topic

pytestmark = pytest.mark.integration

TOPOLOGY = str(Path(__file__).parent / "topologies" / "synthetic_p4")
N = 12_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_trainers_share_the_partitions_and_end_identical(broker, start_worker) -> None:
    topo = load_topology(TOPOLOGY)
    names = TopicNames(topo, f"ddp{uuid.uuid4().hex[:6]}")
    asyncio.run(create_topics(broker.bootstrap, names.all()))
    init = f"tcp://127.0.0.1:{_free_port()}"
    dist = ("--role", "trainer", "--dist-world-size", "2", "--dist-init-method", init)
    trainers = [start_worker(TOPOLOGY, app_id=names.app_id, args=(*dist, "--dist-rank", str(r))) for r in (0, 1)]
    ingest = start_worker(TOPOLOGY, app_id=names.app_id, args=("--role", "ingest"))
    items = list(SyntheticStream.default().events(N))
    asyncio.run(produce_events(broker.bootstrap, names, items))
    want = expected_predictions(topo, items)

    def alive() -> bool:
        return ingest.alive() and all(t.alive() for t in trainers)

    got: set = set()

    def complete(rs: list) -> bool:
        got.clear()
        got.update((row["id"], row["task"]) for r in rs for row in PredictionBatch.from_json(r.value).rows())
        return want <= got

    asyncio.run(read_topic(broker.bootstrap, names.predictions, complete, 180, alive))
    assert got == want

    last: dict[str, dict] = {}

    def settled(rs: list) -> bool:
        last.clear()
        for r in rs:
            snap = orjson.loads(r.value)
            if snap.get("role") == "trainer":
                last[snap["worker"]] = snap
        snaps = list(last.values())
        if len(snaps) < 2 or not all(s.get("distributed") for s in snaps):
            return False
        if sum(sum(s["predicted"].values()) for s in snaps) < len(want):  # snapshots from after the stream
            return False
        steps = {s["steps"] for s in snaps}
        return len(steps) == 1 and len({s["distributed"]["state_sha256"] for s in snaps}) == 1

    asyncio.run(read_topic(broker.bootstrap, names.metrics, settled, 60, alive))
    snaps = list(last.values())
    ranks = sorted(s["distributed"]["rank"] for s in snaps)
    assert ranks == [0, 1] and all(s["distributed"]["backend"] == "gloo" for s in snaps)
    assert snaps[0]["steps"] > 0
    # each trainer predicted its share of the task partitions, and together all of it
    shares = [sum(s["predicted"].values()) for s in snaps]
    digest = snaps[0]["distributed"]["state_sha256"][:12]
    print(f"ddp: steps {snaps[0]['steps']}, predictions per trainer {shares}, state sha256 {digest}… on both")
    assert all(n > 0 for n in shares) and sum(shares) >= len(want)
