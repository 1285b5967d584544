"""Bounded per-task buffers and the samplers that mix them into mini-batches.

>>> s = TemperatureSampler(temperature=1.0)          # proportional
>>> s.allocate({"a": 300, "b": 100, "c": 0}, 8)
{'a': 6, 'b': 2, 'c': 0}
>>> TemperatureSampler(temperature=float("inf")).allocate({"a": 300, "b": 100}, 8)   # uniform
{'a': 4, 'b': 4}
>>> TemperatureSampler(temperature=2.0).allocate({"a": 900, "b": 100}, 8)  # p ~ n^(1/T)
{'a': 6, 'b': 2}
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from stream_mtl.topology import SamplerSpec

__all__ = [
    "AdaptiveSampler",
    "AnnealedTemperatureSampler",
    "MixedBatch",
    "Reservoir",
    "TaskBuffer",
    "TaskSampler",
    "TemperatureSampler",
    "assemble",
    "make_sampler",
    "with_replay",
]


class TaskBuffer:
    """A bounded FIFO of one task's examples, stored in chunks (no per-row Python objects).

    When full, the oldest examples are dropped and counted in :attr:`dropped`.

    >>> b = TaskBuffer(capacity=3)
    >>> b.push(np.zeros((2, 1), np.float32), np.zeros((2, 1), np.float32))
    >>> b.push(np.ones((2, 1), np.float32), np.ones((2, 1), np.float32))
    >>> len(b), b.dropped, b.pop(2)[0].ravel().tolist()
    (3, 1, [0.0, 1.0])
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._chunks: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._size = 0
        self.dropped = 0

    def __len__(self) -> int:
        return self._size

    def push(self, x: np.ndarray, y: np.ndarray) -> None:
        """Append examples ``x [n, d]`` with targets ``y [n, k]``."""
        n = x.shape[0]
        if n == 0:
            return
        if n > self.capacity:
            self.dropped += n - self.capacity
            x, y, n = x[-self.capacity :], y[-self.capacity :], self.capacity
        self._chunks.append((x, y))
        self._size += n
        while self._size > self.capacity:
            over = self._size - self.capacity
            cx, cy = self._chunks[0]
            if cx.shape[0] <= over:
                self._chunks.popleft()
                self._size -= cx.shape[0]
                self.dropped += cx.shape[0]
            else:
                self._chunks[0] = (cx[over:], cy[over:])
                self._size -= over
                self.dropped += over

    def pop(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Remove and return the ``k`` oldest examples (fewer if the buffer holds fewer)."""
        xs, ys = [], []
        while k > 0 and self._chunks:
            cx, cy = self._chunks[0]
            if cx.shape[0] <= k:
                self._chunks.popleft()
                xs.append(cx)
                ys.append(cy)
                k -= cx.shape[0]
                self._size -= cx.shape[0]
            else:
                xs.append(cx[:k])
                ys.append(cy[:k])
                self._chunks[0] = (cx[k:], cy[k:])
                self._size -= k
                k = 0
        if not xs:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
        if len(xs) == 1:
            return xs[0], ys[0]
        return np.concatenate(xs), np.concatenate(ys)


class TaskSampler:
    """Base class: decides how many examples of each task go into the next mini-batch."""

    def weights(self, sizes: dict[str, int]) -> dict[str, float]:  # pragma: no cover - interface
        raise NotImplementedError

    _credit: dict[str, float] | None = None
    _boost: dict[str, tuple[float, int, int]] | None = None  # task → (factor, batches left, of how many)

    def boost_task(self, task: str, factor: float = 2.0, steps: int = 200) -> None:
        """Raise a task's weight ×``factor``, decaying linearly back to ×1 over ``steps`` batches (drift feedback)."""
        if self._boost is None:
            self._boost = {}
        self._boost[task] = (factor, steps, steps)

    def boost_factor(self, task: str) -> float:
        b = (self._boost or {}).get(task)
        if b is None:
            return 1.0
        factor, left, total = b
        return 1.0 + (factor - 1.0) * left / total

    def _decay_boosts(self) -> None:
        for t, (factor, left, total) in list((self._boost or {}).items()):
            if left <= 1:
                del self._boost[t]  # type: ignore[union-attr]
            else:
                self._boost[t] = (factor, left - 1, total)  # type: ignore[index]

    def allocate(self, sizes: dict[str, int], batch_size: int) -> dict[str, int]:
        """Counts per task summing to ``min(batch_size, total available)``, never above a size.

        Fractions left over by rounding are carried to the next call, so over many batches each
        task gets exactly its share (no task is starved by always being rounded down).
        """
        if self._credit is None:
            self._credit = {}
        credit = self._credit
        counts = {t: 0 for t in sizes}
        remaining = min(batch_size, sum(sizes.values()))
        while remaining > 0:
            avail = {t: n - counts[t] for t, n in sizes.items() if n - counts[t] > 0}
            w = self.weights(avail)
            if self._boost:
                w = {t: v * self.boost_factor(t) for t, v in w.items()}
            total = sum(w.values())
            score = {t: remaining * w[t] / total + credit.get(t, 0.0) for t in avail}
            give = {t: max(0, min(math.floor(score[t]), avail[t])) for t in avail}
            over = sum(give.values()) - remaining
            for t in sorted(avail, key=lambda t: (score[t] - give[t], t)):  # trim if credit overshot
                if over <= 0:
                    break
                if give[t] > 0:
                    give[t] -= 1
                    over -= 1
            left = remaining - sum(give.values())
            for t in sorted(avail, key=lambda t: (-(score[t] - give[t]), t)):
                if left <= 0:
                    break
                if give[t] < avail[t]:
                    give[t] += 1
                    left -= 1
            for t, g in give.items():
                counts[t] += g
                credit[t] = max(-1.0, min(1.0, score[t] - g))
            given = sum(give.values())
            if given == 0:  # pragma: no cover - defensive
                break
            remaining -= given
        if self._boost:
            self._decay_boosts()
        return counts


class TemperatureSampler(TaskSampler):
    """``p_t ∝ n_t^(1/T)``: T=1 proportional, T→∞ uniform, T>1 flattens towards rare tasks."""

    def __init__(self, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.temperature = temperature

    def weights(self, sizes: dict[str, int]) -> dict[str, float]:
        if math.isinf(self.temperature):
            return {t: 1.0 for t, n in sizes.items() if n > 0}
        inv = 1.0 / self.temperature
        return {t: float(n) ** inv for t, n in sizes.items() if n > 0}


class AnnealedTemperatureSampler(TemperatureSampler):
    """A temperature that moves linearly from ``start`` to ``end`` over ``steps`` batches.

    >>> s = AnnealedTemperatureSampler(start=5.0, end=1.0, steps=4)
    >>> [round(s.temperature, 1) for _ in range(5) if s.allocate({"a": 90, "b": 10}, 8)]
    [4.0, 3.0, 2.0, 1.0, 1.0]
    """

    def __init__(self, start: float, end: float, steps: int):
        super().__init__(start)
        self.start, self.end, self.steps, self.step = start, end, steps, 0

    def allocate(self, sizes: dict[str, int], batch_size: int) -> dict[str, int]:
        self.step += 1
        frac = min(1.0, self.step / self.steps)
        self.temperature = self.start + (self.end - self.start) * frac
        return super().allocate(sizes, batch_size)


class AdaptiveSampler(TemperatureSampler):
    """Temperature weights, raised for a task whose loss is rising or that a drift alert named.

    :meth:`observe_losses` compares a fast and a slow moving average of each task's loss; a
    task whose fast average is above its slow one gets ×``boost``. :meth:`boost_task` (called by
    drift feedback) raises a task for ``boost_steps`` batches, decaying linearly back to 1.

    >>> s = AdaptiveSampler(temperature=1.0, boost=3.0, boost_steps=10)
    >>> s.boost_task("b")
    >>> s.allocate({"a": 100, "b": 100}, 8)
    {'a': 2, 'b': 6}
    """

    def __init__(self, temperature: float = 1.0, boost: float = 2.0, boost_steps: int = 200):
        super().__init__(temperature)
        self.boost, self.boost_steps = boost, boost_steps
        self.fast: dict[str, float] = {}
        self.slow: dict[str, float] = {}

    def observe_losses(self, losses: dict[str, float]) -> None:
        for t, v in losses.items():
            self.fast[t] = v if t not in self.fast else 0.7 * self.fast[t] + 0.3 * v
            self.slow[t] = v if t not in self.slow else 0.97 * self.slow[t] + 0.03 * v

    def boost_task(self, task: str, factor: float | None = None, steps: int | None = None) -> None:
        super().boost_task(task, self.boost if factor is None else factor, self.boost_steps if steps is None else steps)

    def factor(self, task: str) -> float:
        """The loss-rise factor of a task (×``boost`` while its fast loss average is above its slow one)."""
        if task in self.fast and self.fast[task] > 1.05 * self.slow[task]:
            return self.boost
        return 1.0

    def weights(self, sizes: dict[str, int]) -> dict[str, float]:
        base = super().weights(sizes)
        return {t: w * self.factor(t) for t, w in base.items()}


def make_sampler(spec: SamplerSpec) -> TaskSampler:
    """The sampler a topology declares."""
    if spec.kind == "uniform":
        return TemperatureSampler(float("inf"))
    if spec.kind == "temperature":
        return TemperatureSampler(spec.temperature)
    if spec.kind == "annealed":
        return AnnealedTemperatureSampler(spec.temperature, spec.final_temperature, spec.anneal_steps)
    if spec.kind == "adaptive":
        return AdaptiveSampler(spec.temperature, spec.boost, spec.boost_steps)
    return TemperatureSampler(1.0)


class Reservoir:
    """A uniform sample (Vitter's algorithm R) of every example a task has seen, for replay.

    >>> r = Reservoir(capacity=100, d=1, k=1, seed=0)
    >>> for i in range(1000):
    ...     r.add(np.full((1, 1), i, np.float32), np.zeros((1, 1), np.float32))
    >>> r.n, r.seen, 200 < float(r.x[: r.n].mean()) < 800     # old and new alike
    (100, 1000, True)
    """

    def __init__(self, capacity: int, d: int, k: int, seed: int = 0):
        self.x = np.zeros((capacity, d), np.float32)
        self.y = np.zeros((capacity, k), np.float32)
        self.n = 0
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        cap = self.x.shape[0]
        for i in range(x.shape[0]):
            self.seen += 1
            if self.n < cap:
                j = self.n
                self.n += 1
            else:
                j = int(self.rng.integers(0, self.seen))
                if j >= cap:
                    continue
            self.x[j] = x[i]
            self.y[j, : y.shape[1]] = y[i]

    def sample(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.rng.integers(0, self.n, size=m) if self.n else np.zeros(0, np.int64)
        return self.x[idx], self.y[idx]


def with_replay(
    batch: MixedBatch, reservoirs: dict[str, Reservoir], share: float, credit: dict[str, float] | None = None
) -> MixedBatch:
    """Append to each task's block ``share`` of its rows drawn from the task's reservoir (old examples).

    ``credit`` carries the fractions rounding leaves over to the next batch, so a task with one
    row per batch still gets its replay share over time.
    """
    credit = credit if credit is not None else {}
    xs, ys, blocks, start = [], [], {}, 0
    for task, (a, b) in batch.blocks.items():
        xs.append(batch.x[a:b])
        ys.append(batch.y[a:b])
        res = reservoirs.get(task)
        want = share * (b - a) + credit.get(task, 0.0)
        m = int(want)
        credit[task] = want - m
        if res is not None and res.n and m:
            rx, ry = res.sample(m)
            xs.append(rx)
            ys.append(ry[:, : batch.y.shape[1]])
        n = sum(x.shape[0] for x in xs) - start
        blocks[task] = (start, start + n)
        start += n
    return MixedBatch(np.concatenate(xs), np.concatenate(ys), blocks)


@dataclass
class MixedBatch:
    """One mini-batch mixing tasks, stored as one contiguous block of rows per task.

    ``blocks[task] == (start, stop)``: rows ``start:stop`` are that task's examples; a task
    without a block has no label in this batch and contributes no loss.
    """

    x: np.ndarray  # float32 [B, d]
    y: np.ndarray  # float32 [B, k_max]  (multiclass: class index in column 0)
    blocks: dict[str, tuple[int, int]]

    @property
    def counts(self) -> dict[str, int]:
        return {t: b - a for t, (a, b) in self.blocks.items()}


def assemble(buffers: dict[str, TaskBuffer], counts: dict[str, int], k_max: int) -> MixedBatch:
    """Pop ``counts`` examples from each buffer into one :class:`MixedBatch`."""
    xs, ys = [], []
    blocks: dict[str, tuple[int, int]] = {}
    start = 0
    for task, k in counts.items():
        if k <= 0:
            continue
        x, y = buffers[task].pop(k)
        if y.shape[1] < k_max:
            y = np.pad(y, ((0, 0), (0, k_max - y.shape[1])))
        xs.append(x)
        ys.append(y)
        blocks[task] = (start, start + x.shape[0])
        start += x.shape[0]
    return MixedBatch(np.concatenate(xs), np.concatenate(ys), blocks)
