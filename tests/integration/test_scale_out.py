"""Scale-out: several workers of one topology share the partitions through their consumer groups.

Three worker processes on a four-partition topology, one added and one removed while a producer
runs: every event is predicted (at least once) for each of its tasks, and the work was shared.
Worker roles: an ``ingest`` worker and a ``trainer`` worker together do what one ``all`` does.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest

from stream_mtl.codec import PredictionBatch
from stream_mtl.produce import produce_events
from stream_mtl.synthetic import SyntheticStream
from stream_mtl.topics import TopicNames, create_topics
from stream_mtl.topology import load_topology
from tests.integration.kafka_helpers import expected_predictions, locate_rows, read_topic

pytestmark = pytest.mark.integration

TOPOLOGY = str(Path(__file__).parent / "topologies" / "synthetic_p4")
N = 30_000
CHUNK = 1_000
#: three workers (six processes with their trainers) on two cores: a 2 s session lets a starved member drop out
SESSION = ("--session-timeout", "6")


def _predicted(bootstrap: str, names: TopicNames, want: set, alive, timeout: float = 180) -> Counter:
    counts: Counter[tuple[str, str]] = Counter()
    seen = [0]

    def complete(rs: list) -> bool:
        for r in rs[seen[0] :]:
            counts.update((row["id"], row["task"]) for row in PredictionBatch.from_json(r.value).rows())
        seen[0] = len(rs)
        return want <= counts.keys()

    try:
        asyncio.run(read_topic(bootstrap, names.predictions, complete, timeout, alive))
    except TimeoutError as exc:  # say what is missing
        missing = want - counts.keys()
        by_task = Counter(task for _, task in missing)
        sample = sorted(missing)[:5]
        where = asyncio.run(locate_rows(bootstrap, names, missing, names.app_id))
        raise AssertionError(
            f"{len(missing)} predictions missing, per task {dict(by_task)}: {sample}\n" + "\n".join(where)
        ) from exc
    return counts


def _snapshots(bootstrap: str, names: TopicNames, done, timeout: float = 60) -> dict[str, dict]:
    """The last metrics snapshot of each worker."""
    recs = asyncio.run(read_topic(bootstrap, names.metrics, lambda rs: done(_last_by_worker(rs)), timeout))
    return _last_by_worker(recs)


def _last_by_worker(rs: list) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in rs:
        snap = orjson.loads(r.value)
        out[snap["worker"]] = snap
    return out


def test_workers_join_and_leave_mid_stream_and_nothing_is_lost(broker, start_worker) -> None:
    topo = load_topology(TOPOLOGY)
    names = TopicNames(topo, f"scale{uuid.uuid4().hex[:6]}")
    asyncio.run(create_topics(broker.bootstrap, names.all()))
    items = list(SyntheticStream.default().events(N))
    want = expected_predictions(topo, items)
    done = threading.Event()

    def produce() -> None:
        for i in range(0, len(items), CHUNK):
            asyncio.run(produce_events(broker.bootstrap, names, items[i : i + CHUNK]))
            if not done.is_set():
                time.sleep(0.5)

    producer = threading.Thread(target=produce)
    producer.start()
    a = start_worker(TOPOLOGY, app_id=names.app_id, args=SESSION)
    b = start_worker(TOPOLOGY, app_id=names.app_id, args=SESSION)
    time.sleep(8)
    c = start_worker(TOPOLOGY, app_id=names.app_id, args=SESSION)  # joins mid-stream
    time.sleep(8)
    assert producer.is_alive(), "the membership changes must happen while events still arrive"
    assert b.stop(signal.SIGTERM, timeout=30) == 0  # leaves mid-stream, cleanly
    done.set()
    producer.join(120)
    counts = _predicted(broker.bootstrap, names, want, lambda: a.alive() and c.alive())
    assert set(counts) == want
    # the work was shared: the workers split the source partitions (ingest) and the task partitions (trainer);
    # which member gets what after each change is the broker's group coordination, so two of three is asked
    # the live workers' snapshots from after the end (the topic is read from its start: earlier ones come first)
    ended = time.time()
    live = {f"-{a.proc.pid}", f"-{c.proc.pid}"}

    def final(s: dict[str, dict]) -> bool:
        return len(s) >= 3 and sum(1 for w, x in s.items() if w[w.rfind("-") :] in live and x["ts"] > ended) == 2

    snaps = _snapshots(broker.bootstrap, names, final)
    assert len(snaps) == 3
    shares = {w: (s["events"], sum(s["predicted"].values())) for w, s in snaps.items()}
    dup = sum(counts.values()) - len(want)
    print(f"scale-out: {len(want)} predictions, {dup} duplicates; (events, predictions) per worker {shares}")
    assert sum(1 for ev, _ in shares.values() if ev > 0) >= 2, shares
    assert sum(1 for _, pr in shares.values() if pr > 0) >= 2, shares


def test_ingest_and_trainer_roles_split_the_work(broker, start_worker) -> None:
    topo = load_topology(TOPOLOGY)
    names = TopicNames(topo, f"roles{uuid.uuid4().hex[:6]}")
    asyncio.run(create_topics(broker.bootstrap, names.all()))
    items = list(SyntheticStream.default().events(10_000))
    want = expected_predictions(topo, items)
    ingest = start_worker(TOPOLOGY, app_id=names.app_id, args=("--role", "ingest"))
    trainer = start_worker(TOPOLOGY, app_id=names.app_id, args=("--role", "trainer"))
    asyncio.run(produce_events(broker.bootstrap, names, items, malformed=3))
    counts = _predicted(broker.bootstrap, names, want, lambda: ingest.alive() and trainer.alive())
    assert set(counts) == want

    def settled(s: dict[str, dict]) -> bool:  # each role's latest snapshot from after the stream was through
        roles = {x["role"]: x for x in s.values()}
        if roles.keys() != {"ingest", "trainer"}:
            return False
        return roles["ingest"]["events"] == 10_000 and roles["trainer"]["steps"] > 0

    by_role = {s["role"]: s for s in _snapshots(broker.bootstrap, names, settled).values()}
    assert by_role["ingest"]["events"] == 10_000 and by_role["ingest"]["dlq"] == 3
    assert sum(by_role["ingest"]["predicted"].values()) == 0 and by_role["ingest"]["trainer_pid"] is None
    assert by_role["trainer"]["events"] == 0 and by_role["trainer"]["steps"] > 0
    assert ingest.stop() == 0 and trainer.stop() == 0


def test_an_own_trainer_task_gets_its_own_worker(broker, start_worker) -> None:
    """``r0`` (own_trainer) is trained by a ``--role task:r0`` worker; y0–y2 by the shared model's trainer."""
    path = str(Path(__file__).parent / "topologies" / "own_trainer")
    topo = load_topology(path)
    names = TopicNames(topo, f"own{uuid.uuid4().hex[:6]}")
    asyncio.run(create_topics(broker.bootstrap, names.all()))
    items = list(SyntheticStream.default().events(8_000))
    want = expected_predictions(topo, items)
    workers = [
        start_worker(path, app_id=names.app_id, args=("--role", role)) for role in ("ingest", "trainer", "task:r0")
    ]
    asyncio.run(produce_events(broker.bootstrap, names, items))
    counts = _predicted(broker.bootstrap, names, want, lambda: all(w.alive() for w in workers))
    assert set(counts) == want
    snaps = _snapshots(broker.bootstrap, names, lambda s: {x["role"] for x in s.values()} >= {"trainer", "task:r0"})
    by_role = {s["role"]: s for s in snaps.values()}
    shared, own = by_role["trainer"], by_role["task:r0"]
    assert set(shared["tasks"]) == {"y0", "y1", "y2"} and set(own["tasks"]) == {"r0"}  # two models
    # r0 only by its own trainer (at least once each: a fresh group's first rebalance may re-read a little)
    assert shared["predicted"]["r0"] == 0 and own["predicted"]["r0"] >= 8_000
    assert own["steps"] > 0 and shared["steps"] > 0
    assert all(w.stop() == 0 for w in workers)


def test_a_slow_task_in_its_own_trainer_does_not_hold_back_the_others(broker, start_worker) -> None:
    """``r0``'s steps take 100 ms (~1.3k rows/s); the shared model's tasks are done long before it."""
    path = str(Path(__file__).parent / "topologies" / "slow_own")
    topo = load_topology(path)
    names = TopicNames(topo, f"slow{uuid.uuid4().hex[:6]}")
    asyncio.run(create_topics(broker.bootstrap, names.all()))
    n = 60_000
    items = list(SyntheticStream.default().events(n))
    want = {pair for pair in expected_predictions(topo, items) if pair[1] != "r0"}
    workers = [start_worker(path, app_id=names.app_id, args=("--role", role)) for role in ("all", "task:r0")]
    asyncio.run(produce_events(broker.bootstrap, names, items))
    _predicted(broker.bootstrap, names, want, lambda: all(w.alive() for w in workers))
    # when y0–y2 are done, the slow task is still far behind: it did not hold them back
    snaps = _snapshots(broker.bootstrap, names, lambda s: {x["role"] for x in s.values()} >= {"all", "task:r0"})
    slow = next(s for s in snaps.values() if s["role"] == "task:r0")
    learned = slow["examples_learned"]
    labelled = sum(1 for e in items if e.get("r0") is not None)
    labelled += sum(1 for e in items if "_label" in e and e["_label"]["task"] == "r0")
    print(f"slow task: the shared model finished {len(want)} predictions; r0 had learned {learned} of {labelled}")
    assert learned < labelled // 2


def test_late_labels_find_their_events_after_a_rebalance(broker, start_worker) -> None:
    """Pending examples move with their task partition: a worker that joins restores the rows the first one
    predicted on the partitions it takes over, so their late labels (500 events behind) join there."""
    topo = load_topology(TOPOLOGY)
    names = TopicNames(topo, f"late{uuid.uuid4().hex[:6]}")
    asyncio.run(create_topics(broker.bootstrap, names.all()))
    items = list(SyntheticStream.default().events(16_000))
    late = sum(1 for e in items if "_label" in e)
    half = len(items) // 2
    asyncio.run(produce_events(broker.bootstrap, names, items[:half]))
    a = start_worker(TOPOLOGY, app_id=names.app_id, args=SESSION)
    events_a = sum(1 for e in items[:half] if "_label" not in e)
    _snapshots(broker.bootstrap, names, lambda s: any(x["predicted"].get("r0", 0) >= events_a for x in s.values()), 90)
    b = start_worker(TOPOLOGY, app_id=names.app_id, args=SESSION)  # takes over half of the task partitions
    _snapshots(broker.bootstrap, names, lambda s: len(s) == 2, 90)
    asyncio.run(produce_events(broker.bootstrap, names, items[half:]))

    def joined(snaps: dict[str, dict]) -> int:
        return sum(s["labels"]["r0"]["joined"] for s in snaps.values())

    seen: dict[str, dict] = {}

    def settled(snaps: dict[str, dict]) -> bool:
        seen.update(snaps)
        return len(snaps) == 2 and joined(snaps) >= late

    try:
        snaps = _snapshots(broker.bootstrap, names, settled, 90)
    except TimeoutError:
        raise AssertionError(f"{late} late labels, per worker: {[s['labels']['r0'] for s in seen.values()]}") from None
    assert a.alive() and b.alive()
    counts = [s["labels"]["r0"] for s in snaps.values()]
    print(f"late labels after a rebalance: {late} sent, per worker {counts}")
    assert all(c["joined"] > 0 for c in counts), counts  # both workers joined labels: the partitions were shared
    assert joined(snaps) == late, counts  # each exactly once (a label read again is a duplicate, not a second join)
