"""A synthetic multi-task stream with known structure: for tests, benchmarks and the memory check.

Events have ``n_features`` Gaussian inputs; each task is a noisy linear function of them
(binary: its sign; regression: its value). Tasks can be sparse (most labels missing), labels
can arrive late (``late``: that share of a task's labels leaves the event and follows
``late_after`` events later as a ``{"_label": …}`` item for ``<app>.labels``), and the concept
can drift at a known event index (the task weights change).

>>> gen = SyntheticStream(n_features=3, n_binary=2, n_regression=1, seed=0)
>>> ev = next(iter(gen.events(1)))
>>> sorted(ev)
['f0', 'f1', 'f2', 'id', 'r0', 'y0', 'y1']
>>> synthetic_topology(gen).input_dim
3
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from stream_mtl.topology import EventSchema, FeatureSpec, ModelSpec, TaskSpec, Topology

__all__ = ["SyntheticStream", "synthetic_topology"]


class SyntheticStream:
    """Generator of events with ``n_binary`` binary and ``n_regression`` regression labels."""

    def __init__(
        self,
        n_features: int = 16,
        n_binary: int = 3,
        n_regression: int = 1,
        missing: dict[str, float] | None = None,
        drift_at: int | None = None,
        noise: float = 0.3,
        seed: int = 0,
        late: dict[str, float] | None = None,
        late_after: int = 500,
    ):
        self.n_features = n_features
        self.features = [f"f{i}" for i in range(n_features)]
        self.binary = [f"y{i}" for i in range(n_binary)]
        self.regression = [f"r{i}" for i in range(n_regression)]
        self.missing = missing or {}
        self.late = late or {}
        self.late_after = late_after
        self.drift_at = drift_at
        self.noise = noise
        self.seed = seed
        rng = np.random.default_rng(seed)
        self.w = rng.normal(size=(n_features, n_binary + n_regression))
        self.w_drift = rng.normal(size=(n_features, n_binary + n_regression))

    @classmethod
    def default(cls) -> SyntheticStream:
        """The stream of ``topologies/synthetic``: 16 features, 3 binary tasks and a sparse,
        half-late regression task ``r0`` (half its labels missing, a quarter on the event,
        a quarter late)."""
        return cls(n_features=16, n_binary=3, n_regression=1, missing={"r0": 0.5}, late={"r0": 0.5}, seed=0)

    @property
    def labels(self) -> list[str]:
        return self.binary + self.regression

    def events(self, n: int, start: int = 0, chunk: int = 4096) -> Iterator[dict[str, Any]]:
        """``n`` events with ids ``syn-<start+i>`` (deterministic for a seed), late labels among them."""
        if not self.late:
            yield from self._events(n, start, chunk)
            return
        rng = np.random.default_rng(self.seed + 7 + start)
        waiting: deque[dict[str, Any]] = deque()
        for k, ev in enumerate(self._events(n, start, chunk)):
            for lab, share in self.late.items():
                if lab in ev and rng.random() < share:
                    waiting.append({"_label": {"id": ev["id"], "task": lab, "value": ev.pop(lab)}, "_due": k})
            yield ev
            while waiting and k - waiting[0]["_due"] >= self.late_after:
                yield {"_label": waiting.popleft()["_label"]}
        while waiting:
            yield {"_label": waiting.popleft()["_label"]}

    def _events(self, n: int, start: int, chunk: int) -> Iterator[dict[str, Any]]:
        rng = np.random.default_rng(self.seed + 1 + start)
        done = 0
        while done < n:
            m = min(chunk, n - done)
            x = rng.normal(size=(m, self.n_features))
            idx = np.arange(start + done, start + done + m)
            z = x @ self.w
            if self.drift_at is not None:
                late = idx >= self.drift_at
                z[late] = x[late] @ self.w_drift
            z += rng.normal(scale=self.noise, size=z.shape)
            miss = {lab: rng.random(m) < self.missing.get(lab, 0.0) for lab in self.labels}
            xs = np.round(x, 5).tolist()
            zs = z.tolist()
            nb = len(self.binary)
            for i in range(m):
                ev: dict[str, Any] = {"id": f"syn-{idx[i]}"}
                ev.update(zip(self.features, xs[i], strict=True))
                row = zs[i]
                for j, lab in enumerate(self.binary):
                    if not miss[lab][i]:
                        ev[lab] = row[j] > 0
                for j, lab in enumerate(self.regression):
                    if not miss[lab][i]:
                        ev[lab] = round(row[nb + j], 5)
                yield ev
            done += m


def synthetic_topology(gen: SyntheticStream, name: str = "synthetic", **overrides: Any) -> Topology:
    """The topology matching a :class:`SyntheticStream`."""
    fields = {f: "float" for f in gen.features}
    fields.update({lab: "bool" for lab in gen.binary})
    fields.update({lab: "float" for lab in gen.regression})
    tasks = [TaskSpec(name=lab, kind="binary", label=lab) for lab in gen.binary]
    tasks += [TaskSpec(name=lab, kind="regression", label=lab, loss="huber") for lab in gen.regression]
    ttl = 60.0  # late labels come ``late_after`` events later: seconds at any realistic rate
    tasks = [t.model_copy(update={"label_ttl_s": ttl}) if t.label in gen.late else t for t in tasks]
    params: dict[str, Any] = {
        "name": name,
        "schema": EventSchema(fields=fields),
        "features": [FeatureSpec(name="num", kind="standardize", inputs=gen.features)],
        "tasks": tasks,
        "model": ModelSpec(trunk=[64, 64]),
        "batch_size": 512,
        "ingest_batch": 2000,
    }
    params.update(overrides)
    return Topology(**params)
