"""The multi-task torch model: a shared trunk, one head per task, masked per-task losses.

A task with ``depends_on`` receives its upstream heads' outputs (optionally detached) next
to the trunk features; heads run in dependency order.

>>> import torch
>>> from stream_mtl.topology import EventSchema, FeatureSpec, TaskSpec, Topology, ModelSpec
>>> topo = Topology(name="toy", schema=EventSchema(fields={"x": "float", "a": "bool", "b": "float"}),
...                 features=[FeatureSpec(name="n", inputs=["x"])], model=ModelSpec(trunk=[8]),
...                 tasks=[TaskSpec(name="a", kind="binary", label="a"),
...                        TaskSpec(name="b", kind="regression", label="b", depends_on=["a"])])
>>> m = MTLModel(topo)
>>> out = m(torch.zeros(4, 1))
>>> {k: tuple(v.shape) for k, v in out.items()}
{'a': (4, 1), 'b': (4, 1)}
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from stream_mtl.topology import TaskSpec, Topology

__all__ = ["MTLModel", "block_losses", "task_loss"]


def _activation(task: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    if task.kind in ("binary", "multilabel"):
        return torch.sigmoid(logits)
    if task.kind == "multiclass":
        return torch.softmax(logits, dim=-1)
    return logits


class MTLModel(nn.Module):
    """Shared MLP trunk + one linear head per task, wired by the task dependency graph."""

    def __init__(self, topology: Topology):
        super().__init__()
        spec = topology.model
        layers: list[nn.Module] = []
        width = topology.input_dim
        for size in spec.trunk:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if spec.dropout:
                layers.append(nn.Dropout(spec.dropout))
            width = size
        self.trunk = nn.Sequential(*layers)
        self.tasks = {t.name: t for t in topology.tasks}
        self.order = topology.task_order()
        self.detach_dependencies = spec.detach_dependencies
        self._required_cache: dict[tuple[str, ...], list[str]] = {}
        self.heads = nn.ModuleDict()
        for name in self.order:
            task = self.tasks[name]
            extra = sum(self.tasks[d].output_dim for d in task.depends_on)
            self.heads[name] = nn.Linear(width + extra, task.output_dim)

    def required(self, tasks: list[str]) -> list[str]:
        """``tasks`` plus everything they depend on, in dependency order."""
        key = tuple(tasks)
        hit = self._required_cache.get(key)
        if hit is not None:
            return hit
        need: set[str] = set()
        stack = list(tasks)
        while stack:
            t = stack.pop()
            if t not in need:
                need.add(t)
                stack.extend(self.tasks[t].depends_on)
        out = self._required_cache[key] = [t for t in self.order if t in need]
        return out

    def heads_on(self, h: torch.Tensor, task: str) -> torch.Tensor:
        """Logits of one task from trunk features ``h`` (running its upstream heads first)."""
        if not self.tasks[task].depends_on:
            return self.heads[task](h)
        return self._heads(h, self.required([task]))[task]

    def forward(self, x: torch.Tensor, tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Logits per task (all tasks, or ``tasks`` and their dependencies)."""
        return self._heads(self.trunk(x), self.required(tasks) if tasks is not None else self.order)

    def _heads(self, h: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name in names:
            deps = self.tasks[name].depends_on
            if deps:
                ups = [_activation(self.tasks[d], out[d]) for d in deps]
                if self.detach_dependencies:
                    ups = [u.detach() for u in ups]
                inp = torch.cat([h, *ups], dim=-1)
            else:
                inp = h
            out[name] = self.heads[name](inp)
        return out

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """Probabilities (classification) or values (regression) of one task."""
        return _activation(self.tasks[task], self.forward(x, [task])[task])


def task_loss(task: TaskSpec, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean loss of one task over its rows; ``y`` is ``[n, k]`` (multiclass: index in column 0)."""
    if callable(task.loss):  # the user's own: (logits, targets of this head's width) -> scalar
        return task.loss(logits, y[:, : max(logits.shape[1], 1)] if task.kind != "multiclass" else y[:, :1])
    if task.loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, y[:, : logits.shape[1]])
    if task.loss == "ce":
        return F.cross_entropy(logits, y[:, 0].long())
    if task.loss == "mse":
        return F.mse_loss(logits[:, 0], y[:, 0])
    if task.loss == "huber":
        return F.huber_loss(logits[:, 0], y[:, 0])
    if task.loss == "l1":
        return F.l1_loss(logits[:, 0], y[:, 0])
    raise ValueError(f"unknown loss {task.loss!r}")  # validated at load; defensive


def block_losses(
    model: MTLModel, x: torch.Tensor, y: torch.Tensor, blocks: dict[str, tuple[int, int]]
) -> dict[str, torch.Tensor]:
    """Per-task losses on a mixed batch whose rows ``start:stop`` belong to one task each.

    The trunk runs once over all rows; each head (and the heads it depends on) only over its
    own task's rows. A task with no block (its labels are missing) contributes nothing.
    """
    h = model.trunk(x)
    losses: dict[str, torch.Tensor] = {}
    for name, (a, b) in blocks.items():
        logits = model.heads_on(h[a:b], name)
        losses[name] = task_loss(model.tasks[name], logits, y[a:b])
    return losses
