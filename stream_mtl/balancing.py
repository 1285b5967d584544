"""Online loss balancing: how the per-task losses of one mini-batch become one update.

One base class, :class:`LossBalancer`: :meth:`~LossBalancer.backward` takes the per-task losses
of a step and the shared trunk's parameters, fills every parameter's ``.grad`` and returns the
weight it gave each task (exported as a metric). Streams have no epochs, so everything that
needs "the loss a while ago" uses a sliding window of recent steps.

- :class:`StaticWeights` — ``Σ w_t L_t`` with the topology's task weights.
- :class:`UncertaintyWeighting` — Kendall et al. (2018): learned log-variances ``s_t``,
  ``Σ exp(-s_t) L_t + s_t``; a noisy task learns a large ``s_t`` and so a small weight.
- :class:`DynamicWeightAverage` — Liu et al. (2019): ``w_t ∝ exp(r_t / T)`` where ``r_t`` is
  the ratio of the task's mean loss over the last ``window`` steps to the window before.
- :class:`GradNorm` — Chen et al. (2018): learned weights pushed so each task's gradient norm
  on the last shared layer tracks the mean norm times its relative inverse training rate^α.
- :class:`PCGrad` — Yu et al. (2020): per-task gradients on the shared trunk; a gradient that
  conflicts with another's (negative dot product) loses its component along it.

>>> import torch
>>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
>>> losses = {"a": (w * torch.tensor([1.0, 0.0])).sum(), "b": (w * torch.tensor([-1.0, 0.0])).sum()}
>>> used = PCGrad(["a", "b"]).backward(losses, [w])
>>> w.grad.tolist()                 # opposed gradients: each loses its conflicting component
[0.0, 0.0]
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

import torch

from stream_mtl.topology import BalancerSpec, Topology

__all__ = [
    "DynamicWeightAverage",
    "GradNorm",
    "LossBalancer",
    "PCGrad",
    "StaticWeights",
    "UncertaintyWeighting",
    "make_balancer",
]


class LossBalancer:
    """Base class: turns per-task losses into gradients; subclasses decide the weighting."""

    def __init__(self, tasks: list[str], weights: dict[str, float] | None = None):
        self.tasks = list(tasks)
        self.base = {t: (weights or {}).get(t, 1.0) for t in self.tasks}
        self.last_weights: dict[str, float] = dict(self.base)

    def parameters(self) -> list[torch.nn.Parameter]:
        """Learnable parameters the model's optimiser should update too (none by default)."""
        return []

    def weights(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
        """The weight of each task present in this step."""
        return {t: self.base[t] for t in losses}

    def backward(self, losses: dict[str, torch.Tensor], shared: list[torch.nn.Parameter]) -> dict[str, float]:
        """Fill ``.grad`` of every parameter from the losses; returns the weights used."""
        w = self.weights(losses)
        total = sum(w[t] * loss for t, loss in losses.items())
        total.backward()  # type: ignore[union-attr]
        self.last_weights = {t: float(v) for t, v in w.items()}
        return self.last_weights

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state (checkpoints); tensors go through :meth:`tensors`."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensor state for the checkpoint's safetensors file."""
        return {f"balancer.{i}": p.detach() for i, p in enumerate(self.parameters())}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`tensors` (missing names keep their current value)."""
        mine = dict(self._tensor_params())
        for name, value in tensors.items():
            if name in mine:
                with torch.no_grad():
                    mine[name].copy_(value.to(mine[name].device))

    def _tensor_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(f"balancer.{i}", p) for i, p in enumerate(self.parameters())]


class StaticWeights(LossBalancer):
    """``Σ w_t L_t`` with fixed weights (the topology's ``TaskSpec.weight``)."""


class UncertaintyWeighting(LossBalancer):
    """Homoscedastic uncertainty weighting: ``Σ exp(-s_t) L_t + s_t`` with learned ``s_t``."""

    def __init__(self, tasks: list[str], weights: dict[str, float] | None = None):
        super().__init__(tasks, weights)
        self.log_vars = torch.nn.Parameter(torch.zeros(len(self.tasks)))
        self._index = {t: i for i, t in enumerate(self.tasks)}

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.log_vars]

    def backward(self, losses: dict[str, torch.Tensor], shared: list[torch.nn.Parameter]) -> dict[str, float]:
        total = 0.0
        used = {}
        for t, loss in losses.items():
            s = self.log_vars[self._index[t]]
            total = total + self.base[t] * (torch.exp(-s) * loss + s)
            used[t] = float(self.base[t] * torch.exp(-s.detach()))
        total.backward()  # type: ignore[union-attr]
        self.last_weights = used
        return used

    def to(self, device: torch.device) -> UncertaintyWeighting:
        self.log_vars.data = self.log_vars.data.to(device)
        return self


class DynamicWeightAverage(LossBalancer):
    """DWA over a sliding window: tasks whose loss falls slowly get more weight."""

    def __init__(
        self, tasks: list[str], weights: dict[str, float] | None = None, window: int = 20, temperature: float = 2.0
    ):
        super().__init__(tasks, weights)
        self.window = window
        self.temperature = temperature
        self.history = {t: deque(maxlen=2 * window) for t in self.tasks}

    def ratios(self) -> dict[str, float]:
        """Mean loss of the last window over the window before (1.0 until both are full)."""
        out = {}
        for t, h in self.history.items():
            if len(h) < 2 * self.window:
                out[t] = 1.0
                continue
            old = sum(list(h)[: self.window]) / self.window
            new = sum(list(h)[self.window :]) / self.window
            out[t] = new / old if old > 0 else 1.0
        return out

    def weights(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
        r = self.ratios()
        present = list(losses)
        exps = {t: torch.exp(torch.tensor(r[t] / self.temperature)).item() for t in present}
        z = sum(exps.values())
        return {t: self.base[t] * len(present) * exps[t] / z for t in present}

    def backward(self, losses: dict[str, torch.Tensor], shared: list[torch.nn.Parameter]) -> dict[str, float]:
        used = super().backward(losses, shared)
        for t, loss in losses.items():
            self.history[t].append(float(loss.detach()))
        return used

    def state_dict(self) -> dict[str, Any]:
        return {"history": {t: list(h) for t, h in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for t, h in state.get("history", {}).items():
            if t in self.history:
                self.history[t].extend(float(v) for v in h)


def _flat_grad(loss: torch.Tensor, params: list[torch.nn.Parameter], retain: bool = True) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    flat = [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)]
    return torch.cat(flat)


class GradNorm(LossBalancer):
    """GradNorm: learned task weights that equalise (relative) gradient norms on the last shared layer."""

    def __init__(
        self, tasks: list[str], weights: dict[str, float] | None = None, alpha: float = 1.5, lr: float = 0.025
    ):
        super().__init__(tasks, weights)
        self.alpha = alpha
        self.w = torch.nn.Parameter(torch.ones(len(self.tasks)))
        self.opt = torch.optim.Adam([self.w], lr=lr)
        self._index = {t: i for i, t in enumerate(self.tasks)}
        self.initial: dict[str, float] = {}
        self.last_norms: dict[str, float] = {}

    def backward(self, losses: dict[str, torch.Tensor], shared: list[torch.nn.Parameter]) -> dict[str, float]:
        present = list(losses)
        for t in present:
            self.initial.setdefault(t, max(float(losses[t].detach()), 1e-8))
        last = [p for p in shared if p.requires_grad][-2:]  # the last shared layer (weight and bias)
        idx = [self._index[t] for t in present]
        w = self.w[idx]
        norms = torch.stack([torch.linalg.vector_norm(_flat_grad(losses[t], last)) for t in present])
        g = w * norms  # norms of the weighted task gradients
        ratio = torch.tensor([float(losses[t].detach()) / self.initial[t] for t in present])
        target = (g.mean() * (ratio / ratio.mean()) ** self.alpha).detach()
        self.opt.zero_grad(set_to_none=True)
        torch.abs(g - target).sum().backward(inputs=[self.w])
        self.opt.step()
        with torch.no_grad():  # renormalise: the weights of the present tasks keep summing to their count
            self.w.clamp_(min=1e-3)
            self.w[idx] *= len(present) / self.w[idx].sum()
        used = {t: float(self.base[t] * self.w[self._index[t]].detach()) for t in present}
        total = sum(used[t] * losses[t] for t in present)
        total.backward()  # type: ignore[union-attr]
        self.last_weights = used
        self.last_norms = {t: float(n) for t, n in zip(present, norms.detach(), strict=True)}
        return used

    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial.update({k: float(v) for k, v in state.get("initial", {}).items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights and the moments of their own Adam (``step``, ``exp_avg``, ``exp_avg_sq``)."""
        out = {"balancer.gradnorm_w": self.w.detach()}
        for k, v in self.opt.state.get(self.w, {}).items():
            if torch.is_tensor(v):
                out[f"{_GRADNORM_OPT}{k}"] = v.detach()
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_tensors(tensors)
        moments = {k[len(_GRADNORM_OPT) :]: v for k, v in tensors.items() if k.startswith(_GRADNORM_OPT)}
        if moments:
            self.opt.state[self.w] = {k: v.clone().to(self.w.device) for k, v in moments.items()}

    def _tensor_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [("balancer.gradnorm_w", self.w)]


_GRADNORM_OPT = "balancer.gradnorm_opt."


class PCGrad(LossBalancer):
    """Projecting conflicting gradients on the shared trunk; heads get their own task's gradient."""

    def __init__(self, tasks: list[str], weights: dict[str, float] | None = None, seed: int = 0):
        super().__init__(tasks, weights)
        self.rng = random.Random(seed)
        self.conflicts = 0

    def backward(self, losses: dict[str, torch.Tensor], shared: list[torch.nn.Parameter]) -> dict[str, float]:
        present = list(losses)
        params = [p for p in shared if p.requires_grad]
        grads = {t: _flat_grad(self.base[t] * losses[t], params) for t in present}
        projected = []
        for t in present:
            g = grads[t].clone()
            others = [o for o in present if o != t]
            self.rng.shuffle(others)
            for o in others:
                go = grads[o]
                dot = torch.dot(g, go)
                if dot < 0:
                    g -= dot / (go.norm() ** 2 + 1e-12) * go
                    self.conflicts += 1
            projected.append(g)
        # heads (and anything not shared): the plain weighted sum; the trunk: the projected sum
        total = sum(self.base[t] * losses[t] for t in present)
        total.backward()  # type: ignore[union-attr]
        merged = torch.stack(projected).sum(dim=0)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = merged[offset : offset + n].view_as(p).clone()
            offset += n
        self.last_weights = {t: self.base[t] for t in present}
        return self.last_weights


def make_balancer(spec: BalancerSpec, topology: Topology) -> LossBalancer:
    """The balancer a topology declares (``ModelSpec.balancer``)."""
    tasks = [t.name for t in topology.tasks]
    weights = {t.name: t.weight for t in topology.tasks}
    if spec.kind == "uncertainty":
        return UncertaintyWeighting(tasks, weights)
    if spec.kind == "dwa":
        return DynamicWeightAverage(tasks, weights, window=spec.window, temperature=spec.temperature)
    if spec.kind == "gradnorm":
        return GradNorm(tasks, weights, alpha=spec.alpha, lr=spec.lr)
    if spec.kind == "pcgrad":
        return PCGrad(tasks, weights)
    return StaticWeights(tasks, weights)
