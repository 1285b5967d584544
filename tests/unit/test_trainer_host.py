"""The trainer process: same answers as in a thread, errors carried back, no orphan when the worker dies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import orjson
import pytest

from stream_mtl.checkpoint import CheckpointStore
from stream_mtl.codec import PredictionBatch, TaskBatch, encode_batch
from stream_mtl.synthetic import SyntheticStream, synthetic_topology
from stream_mtl.trainer_host import TrainerError, TrainerHost, TrainerSession

GEN = SyntheticStream(n_features=4, n_binary=2, n_regression=0, seed=3)
TOPO = synthetic_topology(GEN, name="host", batch_size=8)


def frames() -> list[bytes]:
    x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    return [
        encode_batch(TaskBatch(t, [f"e{i}" for i in range(10)], x, [1.0] * 10, round="r", round_size=2))
        for t in ("y0", "y1")
    ]


@pytest.mark.parametrize("process", [True, False])
def test_process_and_thread_give_the_same_predictions(tmp_path, process: bool) -> None:
    host = TrainerHost(lambda: TrainerSession(TOPO, CheckpointStore(tmp_path, TOPO.spec_hash())), process)
    try:
        assert (host.pid is not None) == process and host.pid != os.getpid()
        outputs, _changes, alerts = asyncio.run(host.call("process", frames()))
        assert alerts == []  # no drift in ten rows
        assert [o[0] for o in outputs] == ["y0", "y1"] and [o[2] for o in outputs] == [10, 10]
        assert host.status["steps"] == 3 and host.status["pending"] == 0  # learned once the round was complete
        preds = [PredictionBatch.from_json(o[1]) for o in outputs]
        assert preds[0].model_version.endswith("-0")  # predicted before anything learned from it
        assert host.call_sync("checkpoint") is not None and list(tmp_path.glob("*.safetensors"))
    finally:
        host.close()
    with pytest.raises(TrainerError, match="closed"):
        host.call_sync("snapshot")
    host.close()  # idempotent


def test_a_checkpoint_records_where_to_resume_and_a_new_session_takes_it_once(tmp_path) -> None:
    """The manifest's task offsets cover only frames whose rows are in the weights, not those still buffered."""
    store = CheckpointStore(tmp_path, TOPO.spec_hash())
    session = TrainerSession(TOPO, store)
    x = np.zeros((3, 4), dtype=np.float32)
    first = [
        encode_batch(TaskBatch(t, [f"{t}{i}" for i in range(3)], x, [1.0] * 3, round="a", round_size=2))
        for t in ("y0", "y1")
    ]
    session.process(first, [("host.y0", 0, 40), ("host.y1", 1, 7)])  # round complete: learned
    assert session.trainer.pending() == 0 and session.learned_upto == {"host.y0:0": 41, "host.y1:1": 8}
    # half a round: predicted and buffered, not yet learned
    half = encode_batch(TaskBatch("y0", ["late"], x[:1], [1.0], round="b", round_size=2))
    session.process([half], [("host.y0", 0, 41)])
    assert session.trainer.pending() == 1
    assert session.learned_upto == {"host.y0:0": 41, "host.y1:1": 8}
    name = session.checkpoint()
    assert name is not None
    assert orjson.loads((tmp_path / name).read_bytes())["task_offsets"] == {"host.y0:0": 41, "host.y1:1": 8}
    session.forget_partitions([("host.y1", "y1", 1)])  # revoked: this worker's checkpoints stop speaking for it
    assert session.learned_upto == {"host.y0:0": 41}

    resumed = TrainerSession(TOPO, store)
    assert resumed.trainer.steps == session.trainer.steps
    assert resumed.take_resume_offsets() == {"host.y0:0": 41, "host.y1:1": 8}
    assert resumed.take_resume_offsets() == {}  # only the first assignment replays
    # a partition not read again yet keeps its resume offset in the next checkpoint
    resumed.process([encode_batch(TaskBatch("y0", ["n"], x[:1], [1.0]))], [("host.y0", 0, 41)])
    assert resumed.learned_upto == {"host.y0:0": 42, "host.y1:1": 8}


def test_the_host_does_not_wait_for_the_session_but_a_failed_build_is_reported(tmp_path) -> None:
    def broken() -> TrainerSession:
        time.sleep(0.5)
        raise ValueError("model.balancer kind 'gradnorm' cannot train with torch.distributed")

    t0 = time.monotonic()
    host = TrainerHost(broken)
    assert time.monotonic() - t0 < 0.4  # the worker starts Faust meanwhile
    try:
        with pytest.raises(TrainerError, match=r"cannot train with torch\.distributed"):
            asyncio.run(host.ready())
    finally:
        host.close()


def test_an_error_in_the_trainer_comes_back_with_its_traceback(tmp_path) -> None:
    host = TrainerHost(lambda: TrainerSession(TOPO, CheckpointStore(tmp_path, TOPO.spec_hash())))
    try:
        with pytest.raises(TrainerError, match="CodecError"):
            host.call_sync("process", [b"not a frame"])
        assert host.call_sync("snapshot")["steps"] == 0  # and the process goes on serving
    finally:
        host.close()


def test_the_trainer_process_exits_when_its_worker_is_killed(tmp_path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from stream_mtl.checkpoint import CheckpointStore
        from stream_mtl.synthetic import SyntheticStream, synthetic_topology
        from stream_mtl.trainer_host import TrainerHost, TrainerSession
        topo = synthetic_topology(SyntheticStream(n_features=4, n_binary=1, n_regression=0), name="orphan")
        host = TrainerHost(lambda: TrainerSession(topo, CheckpointStore({str(tmp_path)!r}, topo.spec_hash())))
        print(host.pid, flush=True)
        time.sleep(60)
        """
    )
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(worker.stdout.readline())
        os.kill(child, 0)  # alive, and it ignores SIGTERM: the worker decides when it stops
        os.kill(child, signal.SIGTERM)
        time.sleep(0.3)
        os.kill(child, 0)
        worker.kill()
        worker.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        pytest.fail(f"trainer process {child} outlived its worker")
    finally:
        worker.kill()


def test_labels_joined_after_the_checkpoint_are_learned_again_when_a_crash_replays_them(tmp_path) -> None:
    """The pending changelog does not run ahead of the checkpoint: a replayed label joins its row again."""
    from stream_mtl.codec import label_batch

    gen = SyntheticStream(n_features=4, n_binary=1, n_regression=1, late={"r0": 1.0}, seed=3)
    topo = synthetic_topology(gen, name="held", batch_size=4)
    store = CheckpointStore(tmp_path, topo.spec_hash())
    changelog: dict[str, bytes | None] = {}  # the pending changelog, as the worker writes it

    def run(session: TrainerSession, frames: list[tuple[int, bytes]]) -> None:
        for offset, frame in frames:
            changelog.update(session.process([frame], [("held.r0", 0, offset)])[1])

    def examples(ids: list[str]) -> bytes:
        x = np.random.default_rng(len(ids)).normal(size=(len(ids), 4)).astype(np.float32)
        return encode_batch(TaskBatch("r0", ids, x, [None] * len(ids)))

    def labels(ids: list[str]) -> bytes:
        return encode_batch(label_batch("r0", ids, [1.0] * len(ids), [0.0] * len(ids), [None] * len(ids)))

    session = TrainerSession(topo, store, replay=True)
    run(session, [(0, examples(["a", "b", "c", "d"])), (1, labels(["a", "b"]))])
    assert session.checkpoint() is not None  # learned up to offset 2: the joins of a and b go out
    released = session.writes()  # what the worker's checkpoint timer writes right after the checkpoint
    assert [orjson.loads(v) for k, v in released.items() if k.endswith(":joined")] == [[0, 1]]
    changelog.update(released)
    run(session, [(2, labels(["c"]))])  # c is learned after the checkpoint …
    changelog.update(session.sweep()[1])
    assert session.trainer.pending_labels.counts["r0"]["joined"] == 3
    # … and the worker crashes: the changelog says c still waits, as the checkpoint does
    resumed = TrainerSession(topo, store, replay=True)
    assert resumed.take_resume_offsets() == {"held.r0:0": 2}
    resumed.restore_pending([(k, v) for k, v in changelog.items() if v is not None], [("r0", 0)])
    assert resumed.trainer.pending_labels.rows == 2  # c and d
    run(resumed, [(2, labels(["c"]))])  # the replay
    counts = resumed.trainer.pending_labels.counts["r0"]
    assert counts["joined"] == 1 and counts["duplicate"] == 0
    # a hand-over (rebalance, clean stop) writes everything held: the next owner does not replay
    handed = resumed.handoff()
    assert [orjson.loads(v) for k, v in handed.items() if k.endswith(":joined")] == [[0, 1, 2]]  # a, b, c joined
    assert len(resumed.held) == 0 and resumed.handoff() == {}
