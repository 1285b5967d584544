"""Shared-trunk diagnostics: what each task sends into the trunk, where tasks conflict, how heads move.

A multi-task model shares its trunk, so one task can drown the others (a large gradient share) or
pull against them (gradients with a negative cosine similarity: a *conflict*). Given a mixed
batch (one block of rows per task), :func:`trunk_gradients` computes each task's weighted loss
gradient with respect to the trunk's parameters (one ``autograd.grad`` per task; nothing is
accumulated into ``.grad``, so it does not disturb training), their norms, each task's share of
the total and the pairwise cosine similarities. :func:`head_vectors` and :func:`head_movement`
say how far each head's parameters moved between two moments (relative L2 change).

The :class:`~stream_mtl.trainer.Trainer` computes them every ``diagnostics_every`` steps (500 by
default, off the hot path) and puts them in its snapshot under ``"trunk_diagnostics"``;
``stream-mtl check`` computes them on a topology's sample data.

>>> import numpy as np, torch
>>> from stream_mtl.model import MTLModel
>>> from stream_mtl.topology import EventSchema, FeatureSpec, ModelSpec, TaskSpec, Topology
>>> topo = Topology(name="toy", schema=EventSchema(fields={"x": "float", "a": "bool", "b": "bool"}),
...                 features=[FeatureSpec(name="n", inputs=["x"])], model=ModelSpec(trunk=[4]),
...                 tasks=[TaskSpec(name="a", kind="binary", label="a"), TaskSpec(name="b", kind="binary", label="b")])
>>> _ = torch.manual_seed(0)
>>> model = MTLModel(topo)
>>> model.heads["b"].load_state_dict(model.heads["a"].state_dict())   # two identical heads …
<All keys matched successfully>
>>> x, y = torch.tensor([[1.0], [1.0]]), torch.tensor([[1.0], [0.0]])  # … asked opposite things
>>> g = trunk_gradients(model, x, y, {"a": (0, 1), "b": (1, 2)})
>>> round(sum(g.share.values()), 6), round(g.cosine["a"]["b"], 4), g.worst_conflict()["a"][0]
(1.0, -1.0, 'b')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from stream_mtl.model import MTLModel, block_losses

__all__ = ["TrunkGradients", "head_movement", "head_vectors", "trunk_gradients"]


@dataclass
class TrunkGradients:
    """Per-task gradients into the shared trunk on one batch (JSON-ready through :meth:`to_json`)."""

    #: L2 norm of each task's (weighted) loss gradient over the trunk's parameters
    norm: dict[str, float] = field(default_factory=dict)
    #: each task's norm over the sum of the norms (0 for every task when all are 0)
    share: dict[str, float] = field(default_factory=dict)
    #: cosine similarity of two tasks' trunk gradients (``None`` when either gradient is 0)
    cosine: dict[str, dict[str, float | None]] = field(default_factory=dict)
    #: the task's loss on the batch
    loss: dict[str, float] = field(default_factory=dict)
    #: L2 norm of the gradient reaching the task's own head (``None``: its loss does not depend on it)
    head_norm: dict[str, float | None] = field(default_factory=dict)

    def worst_conflict(self) -> dict[str, tuple[str, float] | None]:
        """Per task, the other task whose gradient points most against it, and that cosine.

        A negative cosine is a conflict; the lowest one is reported even when it is positive
        (no conflict). ``None`` when the task has no other task with a non-zero gradient.
        """
        out: dict[str, tuple[str, float] | None] = {}
        for t, row in self.cosine.items():
            known = [(o, c) for o, c in row.items() if c is not None]
            out[t] = min(known, key=lambda oc: (oc[1], oc[0])) if known else None
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "grad_norm": self.norm,
            "grad_share": self.share,
            "cosine": self.cosine,
            "loss": self.loss,
            "head_grad_norm": self.head_norm,
            "worst_conflict": {t: list(w) if w else None for t, w in self.worst_conflict().items()},
        }


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def trunk_gradients(
    model: MTLModel,
    x: torch.Tensor,
    y: torch.Tensor,
    blocks: dict[str, tuple[int, int]],
    weights: dict[str, float] | None = None,
) -> TrunkGradients:
    """Each task's gradient into the trunk on a mixed batch (rows ``start:stop`` of ``blocks[task]``).

    ``weights`` multiply the task losses (the balancer's last weights: what the update really used);
    default 1. Nothing is written to ``.grad``. A task whose loss does not depend on the trunk (or
    is detached) has a zero gradient. The norm of the gradient reaching each task's own head comes too.
    """
    params = [p for p in model.trunk.parameters() if p.requires_grad]
    out = TrunkGradients()
    if not params or not blocks:
        return out
    with torch.enable_grad():
        losses = block_losses(model, x, y, blocks)
        flat: dict[str, torch.Tensor] = {}
        for t, loss in losses.items():
            out.loss[t] = float(loss.detach())
            w = (weights or {}).get(t, 1.0)
            if not loss.requires_grad:
                flat[t] = torch.zeros(sum(p.numel() for p in params), device=x.device)
                out.head_norm[t] = None
                continue
            head = list(model.heads[t].parameters())
            grads = torch.autograd.grad(w * loss, params + head, retain_graph=True, allow_unused=True)
            trunk, mine = grads[: len(params)], [g for g in grads[len(params) :] if g is not None]
            flat[t] = torch.cat(
                [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(trunk, params, strict=True)]
            ).detach()
            out.head_norm[t] = (
                float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in mine]))) if mine else None
            )
    norms = {t: float(torch.linalg.vector_norm(g)) for t, g in flat.items()}
    total = sum(v for v in norms.values() if math.isfinite(v))
    out.norm = norms
    out.share = {t: (v / total if total > 0 and math.isfinite(v) else 0.0) for t, v in norms.items()}
    names = list(flat)
    for t in names:
        out.cosine[t] = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            na, nb = norms[a], norms[b]
            cos = (
                _finite(float(torch.dot(flat[a], flat[b])) / (na * nb))
                if na > 0 and nb > 0 and math.isfinite(na * nb)
                else None
            )
            out.cosine[a][b] = out.cosine[b][a] = cos
    return out


def head_vectors(model: MTLModel) -> dict[str, torch.Tensor]:
    """A detached flat copy of each head's parameters (to measure movement against later)."""
    return {
        name: torch.cat([p.detach().reshape(-1) for p in head.parameters()]).clone()
        for name, head in model.heads.items()
    }


def head_movement(before: dict[str, torch.Tensor], model: MTLModel) -> dict[str, float]:
    """How far each head moved since ``before`` (:func:`head_vectors`): ``‖Δθ‖ / ‖θ_before‖``.

    >>> from stream_mtl.synthetic import SyntheticStream, synthetic_topology
    >>> m = MTLModel(synthetic_topology(SyntheticStream(n_features=2, n_binary=1, n_regression=0)))
    >>> before = head_vectors(m)
    >>> with torch.no_grad():
    ...     _ = m.heads["y0"].bias.add_(1.0)
    >>> head_movement(before, m)["y0"] > 0
    True
    """
    now = head_vectors(model)
    out = {}
    for name, old in before.items():
        cur = now.get(name)
        if cur is None or cur.shape != old.shape:
            continue
        out[name] = float(torch.linalg.vector_norm(cur - old.to(cur.device)) / (torch.linalg.vector_norm(old) + 1e-12))
    return out
