"""Shared features: computed once per event, reused by every task.

:class:`RunningStandardizer` keeps a running mean and variance per input (Chan et al.'s
parallel update, so a whole batch is merged in one numpy step). Its state is a small dict,
written to a Faust table once per key per batch (coalesced), never once per event.

>>> import numpy as np
>>> s = RunningStandardizer(2)
>>> z = s.update_transform(np.array([[1.0, 10.0], [3.0, 30.0]]))
>>> s.n, s.mean.tolist(), z.round(3).tolist()
(2, [2.0, 20.0], [[-1.0, -1.0], [1.0, 1.0]])
>>> RunningStandardizer.from_state(s.state()).mean.tolist()
[2.0, 20.0]
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["FeatureExtractor", "RunningStandardizer"]


class FeatureExtractor:
    """Base class: turns a batch of raw numeric inputs into features, updating its own state."""

    def update_transform(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def state(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError


class RunningStandardizer(FeatureExtractor):
    """Running standardisation ``(x - mean) / std`` with batch-merged statistics."""

    def __init__(self, dim: int, eps: float = 1e-6):
        self.dim = dim
        self.eps = eps
        self.n = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros(dim, dtype=np.float64)

    def update(self, x: np.ndarray) -> None:
        """Merge a batch ``x`` of shape ``[n, dim]`` into the running statistics."""
        nb = x.shape[0]
        if nb == 0:
            return
        bmean = x.mean(axis=0)
        bm2 = ((x - bmean) ** 2).sum(axis=0)
        total = self.n + nb
        delta = bmean - self.mean
        self.mean = self.mean + delta * (nb / total)
        self.m2 = self.m2 + bm2 + delta**2 * (self.n * nb / total)
        self.n = total

    @property
    def std(self) -> np.ndarray:
        var = self.m2 / max(self.n, 1)
        return np.sqrt(var) + self.eps

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)

    def update_transform(self, x: np.ndarray) -> np.ndarray:
        """Update with the batch, then standardise it with the updated statistics."""
        self.update(x)
        return self.transform(x)

    def state(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunningStandardizer:
        s = cls(len(state["mean"]))
        s.n = int(state["n"])
        s.mean = np.asarray(state["mean"], dtype=np.float64)
        s.m2 = np.asarray(state["m2"], dtype=np.float64)
        return s
