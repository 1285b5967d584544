"""The trainer with each loss balancer, and per-task learning-rate multipliers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream_mtl.batching import MixedBatch
from stream_mtl.topology import BalancerSpec, EventSchema, FeatureSpec, ModelSpec, TaskSpec, Topology
from stream_mtl.trainer import Trainer


def _topology(balancer: str = "static", lr_scale: float = 1.0, **b_task: object) -> Topology:
    """Binary task ``a`` and regression task ``b`` (fed by ``a`` unless ``b_task`` says otherwise)."""
    b_spec = {"depends_on": ["a"], "lr_scale": lr_scale, **b_task}
    return Topology(
        name="learn",
        schema=EventSchema(fields={"x0": "float", "x1": "float", "a": "bool", "b": "float"}),
        features=[FeatureSpec(name="n", inputs=["x0", "x1"])],
        tasks=[
            TaskSpec(name="a", kind="binary", label="a"),
            TaskSpec(name="b", kind="regression", label="b", **b_spec),
        ],
        model=ModelSpec(trunk=[8], balancer=BalancerSpec(kind=balancer)),
    )


def _batch() -> MixedBatch:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 2)).astype(np.float32)
    y = np.concatenate([(x[:8, :1] > 0), x[8:, :1] * 2]).astype(np.float32)
    return MixedBatch(x, y, {"a": (0, 8), "b": (8, 16)})


@pytest.mark.parametrize("kind", ["static", "uncertainty", "dwa", "gradnorm", "pcgrad"])
def test_every_balancer_trains_the_trunk_and_every_head(kind: str) -> None:
    tr = Trainer(_topology(kind), device="cpu")
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    for _ in range(3):
        losses = tr.step(_batch())
    assert set(losses) == {"a", "b"} and all(np.isfinite(v) for v in losses.values())
    moved = {n for n, p in tr.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == set(before), set(before) - moved
    assert set(tr.snapshot()["task_weights"]) == {"a", "b"}


def test_per_task_learning_rate_multiplier_scales_its_head_updates() -> None:
    def head_move(scale: float) -> float:
        tr = Trainer(_topology(lr_scale=scale), device="cpu")
        before = tr.model.heads["b"].weight.detach().clone()
        tr.step(_batch())
        return float((tr.model.heads["b"].weight.detach() - before).abs().max())

    # Adam's first step moves each weight by ~lr: the ratio is the multiplier
    assert head_move(10.0) == pytest.approx(10 * head_move(1.0), rel=0.05)


calls: list[int] = []


def quantile_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A user's own loss: pinball loss at the 0.9 quantile."""
    calls.append(len(y))
    diff = y - logits
    return torch.maximum(0.9 * diff, -0.1 * diff).mean()


def two_losses_topology(loss: object) -> Topology:
    return _topology(loss=loss, depends_on=[])


def test_a_user_callable_loss_is_what_the_task_learns_from() -> None:
    calls.clear()
    tr = Trainer(two_losses_topology(quantile_loss), device="cpu")
    batch = _batch()
    first = tr.step(batch)["b"]
    for _ in range(200):
        last = tr.step(batch)["b"]
    assert calls[0] == 8 and len(calls) == 201  # called on the task's own rows, every step
    assert last < 0.8 * first
    # the pinball loss at 0.9 puts ~90 % of the targets under the prediction: not what MSE would do
    pred = tr.model.heads_on(tr.model.trunk(torch.from_numpy(batch.x[8:])), "b").detach()[:, 0]
    below = float((torch.from_numpy(batch.y[8:, 0]) <= pred).float().mean())
    assert below >= 0.75, below


def test_a_loss_callable_enters_the_topology_hash_and_a_wrong_one_fails_at_load() -> None:
    assert two_losses_topology(quantile_loss).spec_hash() != two_losses_topology("mse").spec_hash()
    assert two_losses_topology(quantile_loss).spec_hash() == two_losses_topology(quantile_loss).spec_hash()
    from stream_mtl.topology import TopologyError

    with pytest.raises(TopologyError, match=r"tasks\[1\]\.loss: a loss callable must take \(logits, y\)"):
        two_losses_topology(lambda logits: logits.sum())
