"""Masked per-task losses, dependency wiring, and predict-then-learn."""

import numpy as np
import torch

from stream_mtl.batching import MixedBatch
from stream_mtl.codec import TaskBatch
from stream_mtl.model import MTLModel, block_losses
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
    blocks = {"a": (0, 3), "r": (3, 6)}  # no rows of task "b": its labels are missing
    losses = block_losses(model, x, y, blocks)
    assert set(losses) == {"a", "r"}
    sum(losses.values()).backward()
    assert model.heads["b"].weight.grad is None
    assert model.heads["a"].weight.grad.abs().sum() > 0


def test_loss_only_counts_the_rows_of_its_task() -> None:
    torch.manual_seed(0)
    model = MTLModel(TOPO)
    x = torch.randn(4, 2)
    y1 = torch.tensor([[1.0], [0.0], [5.0], [5.0]])
    y2 = torch.tensor([[1.0], [0.0], [-9.0], [123.0]])  # rows 2, 3 belong to task b: a's loss must not change
    blocks = {"a": (0, 2), "b": (2, 4)}
    la = block_losses(model, x, y1, blocks)["a"]
    lb = block_losses(model, x, y2, blocks)["a"]
    assert torch.equal(la, lb)
    assert not torch.equal(block_losses(model, x, y1, blocks)["b"], block_losses(model, x, y2, blocks)["b"])


def test_dependent_task_loss_matches_full_forward() -> None:
    torch.manual_seed(0)
    model = MTLModel(TOPO)
    x = torch.randn(5, 2)
    y = torch.randn(5, 1)
    full = model(x)["r"][1:4]
    got = block_losses(model, x, y, {"r": (1, 4)})["r"]
    assert torch.allclose(got, torch.nn.functional.mse_loss(full[:, 0], y[1:4, 0]))


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
    mb = MixedBatch(x, np.ones((4, 1), np.float32), {"a": (0, 1), "b": (1, 2), "r": (2, 4)})
    losses = tr.step(mb)
    assert set(losses) == {"a", "b", "r"} and all(np.isfinite(v) for v in losses.values())


def test_fused_binary_heads_give_the_losses_and_gradients_of_one_head_at_a_time(monkeypatch) -> None:
    import stream_mtl.model as model_module
    from stream_mtl.model import task_loss

    torch.manual_seed(0)
    model = MTLModel(TOPO)
    assert model.fusable == {"a": True, "b": True, "r": False}
    monkeypatch.setattr(model_module, "FUSE_MIN_TASKS", 2)  # fuse the toy's two binary tasks
    x, y = torch.randn(12, 2), (torch.rand(12, 1) > 0.5).float()
    for blocks in (
        {"a": (0, 5), "b": (5, 9), "r": (9, 12)},
        {"b": (0, 4), "r": (4, 7), "a": (7, 12)},
    ):  # adjacent or not
        model.zero_grad()
        fused = block_losses(model, x, y, blocks)
        sum(fused.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        h = model.trunk(x)
        one = {n: task_loss(model.tasks[n], model.heads_on(h[a:b], n), y[a:b]) for n, (a, b) in blocks.items()}
        sum(one.values()).backward()
        assert list(fused) == list(blocks)
        for n in blocks:
            torch.testing.assert_close(fused[n], one[n])
        for n, p in model.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, msg=n)
