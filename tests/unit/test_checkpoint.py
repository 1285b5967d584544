"""Checkpoints: exact round trip, typed errors for broken files, fallback, retention, crash mid-write."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from stream_mtl.checkpoint import CheckpointError, CheckpointStore
from stream_mtl.codec import TaskBatch
from stream_mtl.synthetic import SyntheticStream, synthetic_topology
from stream_mtl.topology import BalancerSpec, ModelSpec
from stream_mtl.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
GEN = SyntheticStream(n_features=4, n_binary=2, n_regression=1, seed=0)
TOPO = synthetic_topology(GEN, name="ckpt", batch_size=8, model=ModelSpec(trunk=[8], balancer=BalancerSpec(kind="dwa")))


def _feed(tr: Trainer, seed: int) -> TaskBatch:
    x = np.random.default_rng(seed).normal(size=(32, 4)).astype(np.float32)
    for task in ("y0", "y1", "r0"):
        tr.observe(TaskBatch(task, [f"{seed}-{i}" for i in range(32)], x, [1.0, 0.0] * 16, offsets={"s:0": [0, 31]}))
    tr.train()
    return TaskBatch("y0", ["probe"] * 32, x, [1.0] * 32)


def _store(tmp_path: Path, keep: int = 3) -> CheckpointStore:
    return CheckpointStore(tmp_path, TOPO.spec_hash(), keep=keep)


def test_round_trip_continues_exactly(tmp_path: Path) -> None:
    a = Trainer(TOPO, device="cpu")
    probe = _feed(a, 1)
    _store(tmp_path).save(a.state_tensors(), a.state_json())
    b = Trainer(TOPO, device="cpu", seed=99)  # different initial weights
    tensors, manifest = _store(tmp_path).load_latest()
    b.restore(tensors, manifest)
    assert b.steps == a.steps and b.lineage == a.lineage and manifest["offsets"] == {"s:0": [0, 31]}
    assert a.observe(probe).scores == b.observe(probe).scores
    _feed(a, 2), _feed(b, 2)  # the optimiser moments and the balancer window came along too
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


@pytest.mark.parametrize("balancer", ["gradnorm", "uncertainty"])
def test_round_trip_carries_the_balancer_state(tmp_path: Path, balancer: str) -> None:
    topo = synthetic_topology(
        GEN, name="ckpt", batch_size=8, model=ModelSpec(trunk=[8], balancer=BalancerSpec(kind=balancer))
    )
    store = CheckpointStore(tmp_path, topo.spec_hash())
    a = Trainer(topo, device="cpu")
    _feed(a, 1)
    store.save(a.state_tensors(), a.state_json())
    b = Trainer(topo, device="cpu", seed=99)
    b.restore(*store.load_latest())
    _feed(a, 2), _feed(b, 2)  # GradNorm's own optimiser moments (or the learned log-variances) came along
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)
    assert a.task_weights == pytest.approx(b.task_weights)


def _saved(tmp_path: Path, steps: int = 2) -> tuple[CheckpointStore, list[Path]]:
    store, tr, paths = _store(tmp_path), Trainer(TOPO, device="cpu"), []
    for k in range(steps):
        _feed(tr, k)
        paths.append(store.save(tr.state_tensors(), tr.state_json()))
    return store, paths


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    store, (first, newest) = _saved(tmp_path)
    weights = newest.with_suffix(".safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{weights.name}: sha256 \w+ does not match the manifest's \w+"):
        store.verify(newest)
    _, manifest = store.load_latest()
    assert manifest["step"] == orjson.loads(first.read_bytes())["step"]


def test_a_bit_flip_is_caught_by_the_hash(tmp_path: Path) -> None:
    store, (_, newest) = _saved(tmp_path)
    weights = newest.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match"):
        store.verify(newest)


def test_a_pickled_file_is_refused_even_with_a_matching_hash(tmp_path: Path) -> None:
    store, (_, newest) = _saved(tmp_path)
    weights = newest.with_suffix(".safetensors")
    torch.save({"w": torch.ones(2)}, weights)  # a pickle where the weights should be
    manifest = orjson.loads(newest.read_bytes())
    manifest["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    newest.write_bytes(orjson.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        store.verify(newest)


def test_another_topology_and_garbage_manifests_are_refused(tmp_path: Path) -> None:
    _, (first, _) = _saved(tmp_path)
    with pytest.raises(CheckpointError, match="topology hash"):
        CheckpointStore(tmp_path, "other").verify(first)
    first.write_bytes(b"{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        _store(tmp_path).verify(first)


def test_only_the_newest_k_are_kept(tmp_path: Path) -> None:
    store, tr = _store(tmp_path, keep=2), Trainer(TOPO, device="cpu")
    for k in range(4):
        _feed(tr, k)
        store.save(tr.state_tensors(), tr.state_json())
    assert len(store.manifests()) == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2


CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from tests.unit.test_checkpoint import TOPO, _feed, _store
    from stream_mtl import checkpoint
    from stream_mtl.trainer import Trainer
    from pathlib import Path
    store, tr = _store(Path({dir!r})), Trainer(TOPO, device="cpu")
    _feed(tr, 0)
    store.save(tr.state_tensors(), tr.state_json())
    print(tr.steps, flush=True)
    _feed(tr, 1)
    real = checkpoint._write_atomic
    def dying(path, data):  # SIGKILL half-way through writing the second checkpoint's weights
        if path.suffix == ".safetensors":
            path.with_name(path.name + ".tmp").write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, data)
    checkpoint._write_atomic = dying
    store.save(tr.state_tensors(), tr.state_json())
    """
)


def test_a_trainer_killed_between_checkpoints_resumes_from_the_last_verified_one(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text(CRASHER.format(root=str(ROOT), dir=str(tmp_path / "ck")))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    saved_step = int(proc.stdout.split()[0])
    tr = Trainer(TOPO, device="cpu")
    tensors, manifest = _store(tmp_path / "ck").load_latest()
    tr.restore(tensors, manifest)
    assert tr.steps == saved_step > 0  # the first checkpoint; the half-written second left no manifest
    assert [p.name for p in (tmp_path / "ck").iterdir() if p.suffix == ".json"] == [f"ckpt-{saved_step:012d}.json"]
    assert os.path.exists(tmp_path / "ck" / f"ckpt-{saved_step:012d}.safetensors")
