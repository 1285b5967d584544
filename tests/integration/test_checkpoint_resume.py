"""A worker checkpoints on SIGTERM and a restarted worker resumes the model from it."""

from __future__ import annotations

import asyncio
import signal

import orjson
import pytest

from stream_mtl.checkpoint import CheckpointStore
from stream_mtl.produce import produce_events
from stream_mtl.synthetic import SyntheticStream
from stream_mtl.topics import TopicNames, create_topics
from stream_mtl.topology import load_topology
from tests.integration.kafka_helpers import read_topic

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
