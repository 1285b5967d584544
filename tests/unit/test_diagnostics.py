"""Shared-trunk diagnostics: computed every N steps by the trainer, in its snapshot, JSON-ready."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import orjson
import pytest
import torch

from stream_mtl.codec import TaskBatch
from stream_mtl.diagnostics import head_vectors, trunk_gradients
from stream_mtl.model import MTLModel
from stream_mtl.synthetic import SyntheticStream, synthetic_topology
from stream_mtl.trainer import DIAGNOSTICS_EVERY, Trainer

TOPO = synthetic_topology(SyntheticStream(n_features=4, n_binary=2, n_regression=1), name="diag", batch_size=8)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    n = torch.get_num_threads()  # tiny models: one thread is faster on a busy machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def feed(trainer: Trainer, rows: int = 64) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 4)).astype(np.float32)
    ids = [f"e{i}" for i in range(rows)]
    for task, y in (("y0", (x[:, 0] > 0) * 1.0), ("y1", (x[:, 1] < 0) * 1.0), ("r0", x[:, 2] * 2.0)):
        trainer.observe(TaskBatch(task, ids, x, y.tolist()))
    trainer.train()


def test_the_trainer_exports_trunk_diagnostics_every_n_steps() -> None:
    trainer = Trainer(TOPO, device="cpu", diagnostics_every=5)
    feed(trainer)  # 3 × 64 rows in steps of 8: 24 steps
    diag = trainer.snapshot()["trunk_diagnostics"]
    assert trainer.steps == 24 and diag["step"] == 20
    assert set(diag["grad_share"]) <= {"y0", "y1", "r0"} and math.isclose(sum(diag["grad_share"].values()), 1.0)
    assert all(v > 0 for v in diag["grad_norm"].values()) and all(v > 0 for v in diag["head_grad_norm"].values())
    assert set(diag["head_movement"]) == {"y0", "y1", "r0"} and all(v > 0 for v in diag["head_movement"].values())
    for a, row in diag["cosine"].items():
        for b, cos in row.items():
            assert cos == diag["cosine"][b][a] and -1.0 <= cos <= 1.0
    orjson.dumps(trainer.snapshot())  # what the worker publishes


def test_by_default_diagnostics_stay_off_the_hot_path() -> None:
    trainer = Trainer(TOPO, device="cpu")
    feed(trainer)
    assert DIAGNOSTICS_EVERY == 500 and trainer.steps < 500
    assert trainer.snapshot()["trunk_diagnostics"] is None
    off = Trainer(TOPO, device="cpu", diagnostics_every=0)
    feed(off)
    assert off.trunk_diagnostics is None and off._heads_at_diagnostics == {}


def test_a_detached_loss_sends_nothing_to_trunk_or_head() -> None:
    model = MTLModel(TOPO)
    before = head_vectors(model)
    x, y = torch.randn(6, 4), torch.ones(6, 1)
    blocks = {"y0": (0, 3), "y1": (3, 6)}
    model.tasks["y1"] = model.tasks["y1"].model_copy(update={"loss": lambda logits, y: logits.sum().detach()})
    model.fusable["y1"] = False
    g = trunk_gradients(model, x, y, blocks)
    assert g.norm["y1"] == 0.0 and g.head_norm["y1"] is None and g.share == {"y0": 1.0, "y1": 0.0}
    assert g.cosine["y0"]["y1"] is None and g.worst_conflict()["y0"] is None
    assert all(torch.equal(before[t], v) for t, v in head_vectors(model).items())  # nothing was updated
