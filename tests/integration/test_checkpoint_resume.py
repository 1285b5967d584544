"""Checkpoints and restarts: SIGTERM checkpoints and the restart resumes the model; SIGKILL after a checkpoint
rewinds the task topics to the offsets that checkpoint learned up to."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import orjson
import pytest

from stream_mtl.changelog import committed_offsets
from stream_mtl.checkpoint import CheckpointStore
from stream_mtl.codec import PredictionBatch
from stream_mtl.produce import produce_events
from stream_mtl.synthetic import SyntheticStream
from stream_mtl.topics import TopicNames, create_topics
from stream_mtl.topology import load_topology
from tests.integration.kafka_helpers import expected_predictions, read_frames, read_topic

pytestmark = pytest.mark.integration
N = 6000


def test_sigterm_checkpoints_and_a_restart_resumes(broker, start_worker, tmp_path) -> None:
    topo = load_topology("synthetic")
    names = TopicNames(topo, "resume")
    asyncio.run(create_topics(broker.bootstrap, names.all()))
    asyncio.run(produce_events(broker.bootstrap, names, SyntheticStream.default().events(N)))
    first = start_worker("synthetic", app_id=names.app_id)

    def trained(rs: list) -> bool:
        return bool(rs) and orjson.loads(rs[-1].value)["steps"] > 0 and orjson.loads(rs[-1].value)["events"] >= N

    snaps = asyncio.run(read_topic(broker.bootstrap, names.metrics, trained, 60, first.alive))
    assert first.stop(signal.SIGTERM) == 0, first.log()[-2000:]
    store = CheckpointStore(tmp_path / "data" / names.app_id / "checkpoints", topo.spec_hash())
    loaded = store.load_latest()
    assert loaded is not None, "SIGTERM wrote no checkpoint"
    _, manifest = loaded
    assert manifest["step"] >= orjson.loads(snaps[-1].value)["steps"] > 0
    assert manifest["offsets"] and manifest["weights_sha256"]

    second = start_worker("synthetic", app_id=names.app_id)

    def resumed(rs: list) -> bool:
        mine = [orjson.loads(r.value) for r in rs if orjson.loads(r.value)["worker"] != snaps[-1].key.decode()]
        return bool(mine)

    recs = asyncio.run(read_topic(broker.bootstrap, names.metrics, resumed, 60, second.alive))
    mine = [orjson.loads(r.value) for r in recs if r.key != snaps[-1].key]
    assert mine[0]["checkpointed_step"] == manifest["step"]  # loaded at start …
    assert mine[0]["steps"] >= manifest["step"]  # … so the model continues, not restarts from step 0
    assert mine[0]["model_version"].endswith(f"-{mine[0]['steps']}")


def test_a_killed_trainer_learns_again_from_its_checkpoint_offsets(broker, start_worker, tmp_path) -> None:
    """SIGKILL after a checkpoint: the restart rewinds the task topics to the checkpoint's offsets.

    Faust commits what was predicted and buffered; the checkpoint holds only what was learned. What the dead
    worker learned after its last checkpoint is lost with it, so the restarted trainer must read it again.
    """
    topo = load_topology("synthetic")
    names = TopicNames(topo, "rewind")
    asyncio.run(create_topics(broker.bootstrap, names.all()))
    items = list(SyntheticStream.default().events(80_000))
    expected = expected_predictions(topo, items)
    asyncio.run(produce_events(broker.bootstrap, names, items[:10_000]))

    def paced() -> None:  # the rest at ~4k events/s while the worker runs (~17 s)
        for i in range(10_000, len(items), 1_000):
            asyncio.run(produce_events(broker.bootstrap, names, items[i : i + 1_000]))
            time.sleep(0.25)

    producer = threading.Thread(target=paced)
    producer.start()
    env = {"STREAM_MTL_CHECKPOINT_INTERVAL": "3", "STREAM_MTL_COMMIT_INTERVAL": "0.3"}
    first = start_worker("synthetic", app_id=names.app_id, env=env)
    store = CheckpointStore(tmp_path / "data" / names.app_id / "checkpoints", topo.spec_hash())
    # kill it ~1.5 s after a checkpoint: it has learned (and committed) past it, the next one is not due yet
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and first.alive():
        newest = store.manifests()[:1]
        if newest and 1.2 < time.time() - newest[0].stat().st_mtime < 2.0:
            break
        time.sleep(0.05)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    producer.join(60)
    loaded = store.load_latest()
    assert loaded is not None, first.log()[-3000:]
    ckpt = loaded[1]["task_offsets"]
    task_topics = [names.task(t.name) for t in topo.tasks]
    parts = [(t, p) for t in task_topics for p in range(topo.partitions)]
    committed = {
        f"{t}:{p}": o
        for (t, p), o in asyncio.run(committed_offsets(broker.bootstrap, names.faust_app_id("all"), parts)).items()
    }
    behind = {tp: committed[tp] - off for tp, off in ckpt.items() if committed.get(tp, 0) > off}
    assert behind, f"nothing was committed past the checkpoint ({ckpt} vs {committed}): the kill came too early"

    second_started_ms = time.time() * 1000
    second = start_worker("synthetic", app_id=names.app_id, env=env)

    def pairs(rs: list) -> set[tuple[str, str]]:
        return {(row["id"], row["task"]) for r in rs for row in PredictionBatch.from_json(r.value).rows()}

    recs = asyncio.run(
        read_topic(broker.bootstrap, names.predictions, lambda rs: pairs(rs) >= expected, 150, second.alive)
    )
    again = pairs([r for r in recs if r.timestamp >= second_started_ms])
    # every example frame between the checkpoint's offset and the commit was read and predicted again
    frames = asyncio.run(read_frames(broker.bootstrap, {tp: (ckpt[tp], committed[tp]) for tp in behind}))
    replayed = {(i, b.task) for b in frames if b.kind == "examples" for i in b.ids}
    assert replayed and replayed <= again, (len(replayed), len(replayed - again))
    assert "trainer.replay_from_checkpoint" in second.log()
    # and checkpointed at once: a second crash replays from where the first replay ended, not from the old one
    newest = store.load_latest()
    assert newest is not None and newest[1]["step"] > loaded[1]["step"]
    assert all(newest[1]["task_offsets"][tp] >= committed[tp] for tp in behind), (newest[1]["task_offsets"], committed)
    # duplicates are bounded by what the killed worker had done
    total_rows = sum(len(PredictionBatch.from_json(r.value)) for r in recs)
    first_rows = sum(len(PredictionBatch.from_json(r.value)) for r in recs if r.timestamp < second_started_ms)
    assert len(expected) <= total_rows <= len(expected) + first_rows
