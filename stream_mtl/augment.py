"""Per-task augmentation of training copies in the trainer: Gaussian noise, mixup, SMOTE oversampling.

Applied to a :class:`~stream_mtl.batching.MixedBatch` after it is assembled and before the
optimiser step, so it only ever touches what is learned from — predictions and metrics are
computed in :meth:`~stream_mtl.trainer.Trainer.observe`, on the real inputs, before any of this.
(Text augmentation happens at routing, where the tokens are; see :mod:`stream_mtl.routing`.)

SMOTE: for a sparse task, synthetic rows interpolate between a recent example of the task and
one of its ``k`` nearest recent neighbours with the same label, until the task holds ``share``
of the mini-batch. The pool of recent examples is bounded (``pool`` rows per task).

>>> import numpy as np
>>> from stream_mtl.batching import MixedBatch
>>> from stream_mtl.topology import EventSchema, FeatureSpec, GaussianNoise, TaskSpec, Topology
>>> topo = Topology(name="toy", schema=EventSchema(fields={"x": "float", "y": "bool"}),
...                 features=[FeatureSpec(name="n", inputs=["x"])],
...                 tasks=[TaskSpec(name="t", kind="binary", label="y", augment=[GaussianNoise(std=0.5)])])
>>> batch = MixedBatch(np.zeros((4, 1), np.float32), np.ones((4, 1), np.float32), {"t": (0, 4)})
>>> out = Augmenter(topo).apply(batch)
>>> bool((out.x != 0).any()), bool((batch.x == 0).all())      # a copy changed, the original did not
(True, True)
"""

from __future__ import annotations

import zlib

import numpy as np

from stream_mtl.batching import MixedBatch
from stream_mtl.topology import GaussianNoise, Mixup, Oversample, Topology

__all__ = ["Augmenter"]


class _Pool:
    """The last ``size`` training examples of one task (ring buffer)."""

    def __init__(self, size: int, d: int, k: int):
        self.x = np.zeros((size, d), np.float32)
        self.y = np.zeros((size, k), np.float32)
        self.n = 0
        self.pos = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        size = self.x.shape[0]
        if x.shape[0] >= size:
            x, y = x[-size:], y[-size:]
        m = x.shape[0]
        idx = (self.pos + np.arange(m)) % size
        self.x[idx] = x
        self.y[idx, : y.shape[1]] = y
        self.pos = int((self.pos + m) % size)
        self.n = min(size, self.n + m)


class Augmenter:
    """The trainer-side augmentations of every task of a topology (seeded, deterministic)."""

    def __init__(self, topology: Topology, seed: int = 0):
        self.tasks = {t.name: t for t in topology.tasks}
        self.k_max = max(t.output_dim for t in topology.tasks)
        self.active = {t.name for t in topology.tasks if any(a.kind in ("noise", "mixup", "smote") for a in t.augment)}
        self.rng = {t.name: np.random.default_rng(seed + zlib.crc32(t.name.encode())) for t in topology.tasks}
        self.pools = {
            t.name: _Pool(a.pool, topology.input_dim, self.k_max)
            for t in topology.tasks
            for a in t.augment
            if isinstance(a, Oversample)
        }
        self.synthetic = {name: 0 for name in self.pools}

    def remember(self, task: str, x: np.ndarray, y: np.ndarray) -> None:
        """Feed a task's new training examples to its SMOTE pool (no-op without oversampling)."""
        pool = self.pools.get(task)
        if pool is not None and x.shape[0]:
            pool.add(x, y)

    def apply(self, batch: MixedBatch) -> MixedBatch:
        """A new batch with each task's augmentations applied to its rows (the input is untouched)."""
        if not self.active.intersection(batch.blocks) and not self.pools:
            return batch
        xs, ys, blocks, start = [], [], {}, 0
        total = batch.x.shape[0]
        for name, (a, b) in batch.blocks.items():
            x, y = batch.x[a:b], batch.y[a:b]
            if name in self.active:
                x, y = self._augment(name, x.copy(), y.copy(), total)
            xs.append(x)
            ys.append(y)
            blocks[name] = (start, start + x.shape[0])
            start += x.shape[0]
        for name in self.pools:  # a sparse task absent from this batch can still get synthetic rows
            if name not in batch.blocks:
                sx, sy = self._smote(name, np.zeros((0, batch.x.shape[1]), np.float32), total)
                if sx.shape[0]:
                    xs.append(sx)
                    ys.append(sy)
                    blocks[name] = (start, start + sx.shape[0])
                    start += sx.shape[0]
        return MixedBatch(np.concatenate(xs), np.concatenate(ys), blocks)

    def _augment(self, name: str, x: np.ndarray, y: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng[name]
        for aug in self.tasks[name].augment:
            if isinstance(aug, GaussianNoise):
                x += rng.normal(0.0, aug.std, size=x.shape).astype(np.float32)
            elif isinstance(aug, Mixup) and x.shape[0] > 1:
                lam = rng.beta(aug.alpha, aug.alpha, size=(x.shape[0], 1)).astype(np.float32)
                perm = rng.permutation(x.shape[0])
                x = lam * x + (1 - lam) * x[perm]
                y = lam * y + (1 - lam) * y[perm]
            elif isinstance(aug, Oversample):
                sx, sy = self._smote(name, x, total)
                if sx.shape[0]:
                    x, y = np.concatenate([x, sx]), np.concatenate([y, sy])
        return x, y

    def _smote(self, name: str, x: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
        aug = next(a for a in self.tasks[name].augment if isinstance(a, Oversample))
        pool = self.pools[name]
        want = int(aug.share * total) - x.shape[0]
        d = pool.x.shape[1]
        if want <= 0 or pool.n < 2:
            return np.zeros((0, d), np.float32), np.zeros((0, self.k_max), np.float32)
        rng = self.rng[name]
        px, py = pool.x[: pool.n], pool.y[: pool.n]
        anchors = rng.integers(0, pool.n, size=want)
        out_x = np.empty((want, d), np.float32)
        out_y = np.empty((want, self.k_max), np.float32)
        regression = self.tasks[name].kind == "regression"
        for j, i in enumerate(anchors.tolist()):
            same = np.arange(pool.n) if regression else np.flatnonzero((py == py[i]).all(axis=1))
            same = same[same != i]
            if same.size == 0:
                out_x[j], out_y[j] = px[i], py[i]
                continue
            dist = ((px[same] - px[i]) ** 2).sum(axis=1)
            near = same[np.argsort(dist)[: aug.k]]
            nb = int(rng.choice(near))
            u = np.float32(rng.random())
            out_x[j] = px[i] + u * (px[nb] - px[i])
            out_y[j] = py[i] + u * (py[nb] - py[i]) if regression else py[i]
        self.synthetic[name] += want
        return out_x, out_y
