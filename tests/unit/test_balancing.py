"""Loss balancers: each does what it is for, on a toy problem."""

from __future__ import annotations

import math

import torch

from stream_mtl.balancing import DynamicWeightAverage, GradNorm, PCGrad, StaticWeights, UncertaintyWeighting


def _shared_problem(seed: int = 0):
    torch.manual_seed(seed)
    trunk = torch.nn.Linear(4, 8)
    heads = {"clean": torch.nn.Linear(8, 1), "noisy": torch.nn.Linear(8, 1)}
    return trunk, heads


def test_uncertainty_weighting_gives_a_noisy_task_a_lower_weight() -> None:
    trunk, heads = _shared_problem()
    bal = UncertaintyWeighting(["clean", "noisy"])
    params = [*trunk.parameters(), *heads["clean"].parameters(), *heads["noisy"].parameters()]
    opt = torch.optim.Adam([{"params": params, "lr": 1e-2}, {"params": bal.parameters(), "lr": 5e-2}])
    gen = torch.Generator().manual_seed(1)
    for _ in range(400):
        x = torch.randn(64, 4, generator=gen)
        y = x.sum(dim=1, keepdim=True)
        h = torch.relu(trunk(x))
        losses = {
            "clean": torch.nn.functional.mse_loss(heads["clean"](h), y),
            "noisy": torch.nn.functional.mse_loss(heads["noisy"](h), y + 3.0 * torch.randn(64, 1, generator=gen)),
        }
        opt.zero_grad()
        used = bal.backward(losses, list(trunk.parameters()))
        opt.step()
    assert used["noisy"] < 0.5 * used["clean"], used


def test_pcgrad_removes_only_the_conflicting_component() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    a, b = torch.tensor([1.0, 1.0]), torch.tensor([-1.0, 0.0])  # dot < 0: they conflict
    bal = PCGrad(["a", "b"])
    bal.backward({"a": (w * a).sum(), "b": (w * b).sum()}, [w])
    # a projected off b: [0, 1]; b projected off a: [-0.5, 0.5]; summed
    torch.testing.assert_close(w.grad, torch.tensor([-0.5, 1.5]))
    assert bal.conflicts == 2
    w.grad = None
    bal.backward({"a": (w * a).sum(), "b": (w * torch.tensor([1.0, 0.0])).sum()}, [w])  # no conflict
    torch.testing.assert_close(w.grad, torch.tensor([2.0, 1.0]))  # the plain sum


def test_gradnorm_equalises_gradient_norms() -> None:
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 4)
    heads = {"small": torch.nn.Linear(4, 1), "big": torch.nn.Linear(4, 1)}
    bal = GradNorm(["small", "big"], alpha=0.0, lr=0.01)  # alpha 0: pure norm equalisation
    params = [*trunk.parameters(), *heads["small"].parameters(), *heads["big"].parameters()]
    opt = torch.optim.SGD(params, lr=1e-3)
    gen = torch.Generator().manual_seed(2)

    def losses() -> dict[str, torch.Tensor]:
        x = torch.randn(32, 4, generator=gen)
        h = trunk(x)
        y = x[:, :1]
        return {"small": ((heads["small"](h) - y) ** 2).mean(), "big": 20 * ((heads["big"](h) - y) ** 2).mean()}

    def weighted_ratio() -> float:
        n = bal.last_norms
        return (bal.last_weights["big"] * n["big"]) / (bal.last_weights["small"] * n["small"])

    opt.zero_grad()
    bal.backward(losses(), list(trunk.parameters()))
    first = weighted_ratio()
    tail = []
    for step in range(400):
        opt.zero_grad()
        bal.backward(losses(), list(trunk.parameters()))
        opt.step()
        if step >= 350:
            tail.append(math.log(weighted_ratio()))
    assert first > 5  # the ×20 task dominated the trunk's gradient …
    assert abs(sum(tail) / len(tail)) < math.log(2)  # … until its weight fell to match the norms
    assert abs(sum(bal.last_weights.values()) - 2.0) < 1e-4  # weights renormalised to the task count


def test_dwa_raises_the_weight_of_a_task_whose_loss_stopped_falling() -> None:
    bal = DynamicWeightAverage(["falling", "stuck"], window=5, temperature=0.5)
    w = torch.nn.Parameter(torch.ones(1))
    for step in range(12):
        losses = {"falling": w.sum() * (1.0 / (step + 1)), "stuck": w.sum() * 1.0}
        used = bal.backward(losses, [w])
    assert used["stuck"] > used["falling"]
    assert abs(sum(used.values()) - 2.0) < 1e-6


def test_static_weights_are_the_task_weights() -> None:
    w = torch.nn.Parameter(torch.ones(1))
    used = StaticWeights(["a", "b"], {"a": 2.0, "b": 0.5}).backward({"a": w.sum(), "b": w.sum()}, [w])
    assert used == {"a": 2.0, "b": 0.5} and w.grad.item() == 2.5
