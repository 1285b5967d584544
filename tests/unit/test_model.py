"""Masked per-task losses, dependency wiring, and predict-then-learn."""

import numpy as np
import torch

from stream_mtl.batching import MixedBatch
from stream_mtl.codec import TaskBatch
from stream_mtl.model import MTLModel, masked_task_losses
from stream_mtl.topology import EventSchema, FeatureSpec, ModelSpec, TaskSpec, Topology
from stream_mtl.trainer import Trainer

TOPO = Topology(
    name="toy",
    schema=EventSchema(fields={"x1": "float", "x2": "float", "a": "bool", "b": "bool", "r": "float"}),
    features=[FeatureSpec(name="n", inputs=["x1", "x2"])],
    tasks=[
        TaskSpec(name="a", kind="binary", label="a"),
        TaskSpec(name="b", kind="binary", label="b"),
        TaskSpec(name="r", kind="regression", label="r", depends_on=["a"]),
    ],
    model=ModelSpec(trunk=[16]),
    batch_size=8,
)


def test_missing_label_contributes_nothing() -> None:
    torch.manual_seed(0)
    model = MTLModel(TOPO)
    x = torch.randn(6, 2)
    y = torch.ones(6, 1)
    task_idx = torch.tensor([0, 0, 0, 2, 2, 2])  # no row of task "b": its labels are missing
    out = model(x)
    losses = masked_task_losses(model, out, y, task_idx, ["a", "b", "r"])
    assert set(losses) == {"a", "r"}
    sum(losses.values()).backward()
    assert model.heads["b"].weight.grad is None or torch.all(model.heads["b"].weight.grad == 0)
    assert model.heads["a"].weight.grad.abs().sum() > 0


def test_loss_only_counts_the_rows_of_its_task() -> None:
    torch.manual_seed(0)
    model = MTLModel(TOPO)
    x = torch.randn(4, 2)
    out = model(x)
    y1 = torch.tensor([[1.0], [0.0], [5.0], [5.0]])
    y2 = torch.tensor([[1.0], [0.0], [-9.0], [123.0]])  # rows 2, 3 belong to task b: a's loss must not change
    idx = torch.tensor([0, 0, 1, 1])
    la = masked_task_losses(model, out, y1, idx, ["a", "b", "r"])["a"]
    lb = masked_task_losses(model, out, y2, idx, ["a", "b", "r"])["a"]
    assert torch.equal(la, lb)


def test_dependent_head_takes_upstream_output() -> None:
    model = MTLModel(TOPO)
    assert model.heads["r"].in_features == 16 + 1
    assert model.required(["r"]) == ["a", "r"]


def test_predict_then_learn() -> None:
    tr = Trainer(TOPO, device="cpu", seed=0)
    x = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
    batch = TaskBatch("a", [f"e{i}" for i in range(8)], x, [1.0] * 8)
    before = tr.model.predict(torch.from_numpy(x), "a").numpy()[:, 0]
    preds = tr.observe(batch)
    assert preds.scores == before.tolist()  # predicted before any update
    assert preds.model_version == tr.version and tr.steps == 0
    assert tr.metrics["a"].n == 8
    steps = tr.train()
    assert steps == 1 and tr.pending() == 0
    after = tr.model.predict(torch.from_numpy(x), "a").numpy()[:, 0]
    assert (after > before).all()  # learned towards the label


def test_training_step_mixes_tasks() -> None:
    tr = Trainer(TOPO, device="cpu", seed=0)
    x = np.zeros((4, 2), np.float32)
    mb = MixedBatch(x, np.ones((4, 1), np.float32), np.array([0, 1, 2, 2]), {"a": 1, "b": 1, "r": 2})
    losses = tr.step(mb)
    assert set(losses) == {"a", "b", "r"} and all(np.isfinite(v) for v in losses.values())
