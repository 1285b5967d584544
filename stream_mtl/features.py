"""Shared features: computed once per event, reused by every task.

Each :class:`FeatureExtractor` turns a batch of validated events (:class:`RawBatch`) into its
columns of the shared feature vector, updating its own state; :class:`FeatureSet` runs the
extractors of one source partition once per batch, however many tasks read the result.
State that must survive a restart (running statistics, per-entity aggregates) is a small dict
per key, written to the Faust ``features`` table once per key per batch, never per event.

>>> import numpy as np
>>> s = RunningStandardizer(["a", "b"])
>>> batch = RawBatch(events=[{}, {}], numeric=np.array([[1.0, 10.0], [3.0, 30.0]]), columns=["a", "b"])
>>> z = s.update_transform(batch)
>>> s.n, s.mean.tolist(), z.round(3).tolist()
(2, [2.0, 20.0], [[-1.0, -1.0], [1.0, 1.0]])
>>> TextHasher("body", dim=8).tokens({"body": "Good, GOOD service"})
['good', 'good', 'service']
"""

from __future__ import annotations

import math
import re
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_mtl.topology import FeatureSpec, Topology

__all__ = [
    "CategoricalHasher",
    "EntityAggregate",
    "FeatureExtractor",
    "FeatureSet",
    "RawBatch",
    "RunningStandardizer",
    "TextHasher",
    "make_extractor",
]

#: Hashed-token cache entries kept per hashing extractor (bounded; cleared when full).
HASH_CACHE_SIZE = 100_000


@dataclass
class RawBatch:
    """Validated events of one source partition, with their numeric inputs as one matrix."""

    events: list[dict[str, Any]]
    numeric: np.ndarray  # float64 [n, len(columns)]
    columns: list[str]  # the numeric fields, in matrix column order
    times: np.ndarray | None = None  # event times (seconds); None: ingest time
    tokens: dict[str, list[list[str]]] = field(default_factory=dict)  # text feature → tokens per event
    #: source offsets of the events (increasing); stateful extractors skip the ones already in their state
    offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.events)

    def column_index(self, names: list[str]) -> list[int]:
        pos = {c: i for i, c in enumerate(self.columns)}
        return [pos[n] for n in names]


class FeatureExtractor:
    """Base class: one shared feature. Parameters go to ``__init__``; state stays inside.

    Subclasses set :attr:`width` and implement :meth:`update_transform`; stateful ones also
    implement :meth:`state`/:meth:`load_state` (one JSON-ready dict per table key).
    """

    width: int = 0
    calls: int = 0  # batches transformed (tests count them: once per batch, never per task)

    def update_transform(self, batch: RawBatch) -> np.ndarray:  # pragma: no cover - interface
        """Columns ``[len(batch), width]`` (float32) for the batch, after updating state with it."""
        raise NotImplementedError

    def state(self) -> dict[str, dict[str, Any] | None]:
        """Table key suffix → state (``None``: delete the key) changed since the last call."""
        return {}

    def load_state(self, suffix: str, state: dict[str, Any]) -> None:
        """Restore one key's state (written by :meth:`state`)."""


class RunningStandardizer(FeatureExtractor):
    """Running standardisation ``(x - mean) / std`` with batch-merged statistics (Chan et al.)."""

    def __init__(self, inputs: list[str], eps: float = 1e-6):
        self.inputs = list(inputs)
        self.width = len(self.inputs)
        self.eps = eps
        self.n = 0
        self.mean = np.zeros(self.width, dtype=np.float64)
        self.m2 = np.zeros(self.width, dtype=np.float64)
        #: the next source offset to fold in: a replayed event (after a crash) is not counted twice
        self.upto = 0
        self._cols: list[int] | None = None

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

    def update_transform(self, batch: RawBatch) -> np.ndarray:
        """Update with the batch, then standardise it with the updated statistics."""
        self.calls += 1
        if self._cols is None:
            self._cols = batch.column_index(self.inputs)
        cols = self._cols
        x = batch.numeric if cols == list(range(batch.numeric.shape[1])) else batch.numeric[:, cols]
        offsets = batch.offsets
        if offsets is None:
            self.update(x)
        else:
            skip = int(np.searchsorted(offsets, self.upto)) if self.upto else 0
            self.update(x[skip:] if skip else x)
            self.upto = max(self.upto, int(offsets[-1]) + 1)
        return ((x - self.mean) / self.std).astype(np.float32)

    def state(self) -> dict[str, dict[str, Any] | None]:
        return {"": {"n": self.n, "mean": self.mean.tolist(), "m2": self.m2.tolist(), "o": self.upto}}

    def load_state(self, suffix: str, state: dict[str, Any]) -> None:
        if len(state.get("mean", [])) == self.width:
            self.n = int(state["n"])
            self.mean = np.asarray(state["mean"], dtype=np.float64)
            self.m2 = np.asarray(state["m2"], dtype=np.float64)
            self.upto = int(state.get("o", 0))


def _bucket(token: str, dim: int) -> tuple[int, float]:
    h = zlib.crc32(token.encode())
    return h % dim, (1.0 if (h >> 31) & 1 else -1.0)


class _Hashing(FeatureExtractor):
    def __init__(self, dim: int):
        self.width = dim
        self._cache: dict[str, tuple[int, float]] = {}

    def _slot(self, token: str) -> tuple[int, float]:
        hit = self._cache.get(token)
        if hit is None:
            if len(self._cache) >= HASH_CACHE_SIZE:
                self._cache.clear()
            hit = self._cache[token] = _bucket(token, self.width)
        return hit


class CategoricalHasher(_Hashing):
    """Categorical fields hashed into ``dim`` signed buckets (the hashing trick; no vocabulary).

    >>> h = CategoricalHasher(["country", "device"], dim=16)
    >>> out = h.update_transform(RawBatch(events=[{"country": "DE", "device": "ios"}], numeric=np.zeros((1, 0)),
    ...                                   columns=[]))
    >>> int((out != 0).sum())
    2
    """

    def __init__(self, inputs: list[str], dim: int = 32):
        super().__init__(dim)
        self.inputs = list(inputs)

    def update_transform(self, batch: RawBatch) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(batch), self.width), dtype=np.float32)
        slot = self._slot
        for i, ev in enumerate(batch.events):
            for name in self.inputs:
                v = ev.get(name)
                if v is not None:
                    j, sign = slot(f"{name}={v}")
                    out[i, j] += sign
        return out


_TOKEN = re.compile(r"[a-z0-9']+")


class TextHasher(_Hashing):
    """A hashing vectoriser over one text field: lower-cased word tokens, signed buckets, L2-normalised.

    The tokens are computed once per event and kept on the batch (:attr:`RawBatch.tokens`), so
    per-task text augmentation re-vectorises them without tokenising again.
    """

    def __init__(self, field_name: str, dim: int = 256, name: str | None = None):
        super().__init__(dim)
        self.field = field_name
        self.name = name or field_name

    def tokens(self, ev: dict[str, Any]) -> list[str]:
        text = ev.get(self.field)
        return _TOKEN.findall(text.lower()) if type(text) is str else []

    def vectorize(self, token_lists: list[list[str]]) -> np.ndarray:
        """Vectors of already tokenised texts (what augmentation calls)."""
        out = np.zeros((len(token_lists), self.width), dtype=np.float32)
        slot = self._slot
        for i, toks in enumerate(token_lists):
            for tok in toks:
                j, sign = slot(tok)
                out[i, j] += sign
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out

    def update_transform(self, batch: RawBatch) -> np.ndarray:
        self.calls += 1
        toks = [self.tokens(ev) for ev in batch.events]
        batch.tokens[self.name] = toks
        return self.vectorize(toks)


class EntityAggregate(FeatureExtractor):
    """Per-entity decayed count and mean of numeric inputs, over a window, with bounded state.

    For each event the features describe the entity's history *before* it (point-in-time, no
    leakage of the event into its own features): ``log1p(count)`` and the mean of each input,
    both exponentially decayed with half-life ``window_s``. An entity idle for ``ttl_s`` is
    evicted, and at most ``max_entities`` are kept (least recently seen evicted first).

    >>> agg = EntityAggregate("user", ["amount"], window_s=60, ttl_s=600, max_entities=10)
    >>> evs = [{"user": "u1"}, {"user": "u1"}, {"user": "u2"}]
    >>> b = RawBatch(events=evs, numeric=np.array([[10.0], [20.0], [5.0]]), columns=["amount"],
    ...              times=np.array([0.0, 0.0, 0.0]))
    >>> agg.update_transform(b).astype(float).round(3).tolist()
    [[0.0, 0.0], [0.693, 10.0], [0.0, 0.0]]
    >>> sorted(agg.state())
    ['u1', 'u2']
    """

    def __init__(
        self,
        key: str,
        inputs: list[str],
        window_s: float = 3600.0,
        ttl_s: float = 86_400.0,
        max_entities: int = 100_000,
        clock: Callable[[], float] = time.time,
    ):
        self.key = key
        self.inputs = list(inputs)
        self.width = 1 + len(self.inputs)
        self.decay = math.log(2) / window_s
        self.ttl_s = ttl_s
        self.max_entities = max_entities
        self.clock = clock
        #: entity → [last_time, decayed count, decayed sums …], least recently seen first
        self.entities: OrderedDict[str, list[float]] = OrderedDict()
        self._dirty: set[str] = set()
        self._evicted: set[str] = set()
        #: entity → the next source offset to fold in (replayed events are not counted twice)
        self.upto: dict[str, int] = {}
        self.evicted = 0
        self._cols: list[int] | None = None

    def update_transform(self, batch: RawBatch) -> np.ndarray:
        self.calls += 1
        n = len(batch)
        out = np.zeros((n, self.width), dtype=np.float32)
        if self._cols is None:
            self._cols = batch.column_index(self.inputs)
        vals = batch.numeric[:, self._cols].tolist() if self.inputs else [[]] * n
        now = self.clock()
        times = batch.times.tolist() if batch.times is not None else [now] * n
        ents, decay, k = self.entities, self.decay, len(self.inputs)
        offsets = batch.offsets.tolist() if batch.offsets is not None else None
        upto = self.upto
        for i, ev in enumerate(batch.events):
            key = str(ev[self.key])
            t = times[i]
            st = ents.get(key)
            if offsets is not None:
                if st is not None and offsets[i] < upto.get(key, 0):  # replayed: already in the state
                    f = math.exp(-decay * max(0.0, t - st[0]))
                    cnt = st[1] * f
                    out[i, 0] = math.log1p(cnt)
                    if cnt > 0:
                        for j in range(k):
                            out[i, 1 + j] = st[2 + j] * f / cnt
                    continue
                upto[key] = offsets[i] + 1
            if st is None:
                st = ents[key] = [t, 0.0] + [0.0] * k
            else:
                ents.move_to_end(key)
                f = math.exp(-decay * max(0.0, t - st[0]))
                st[1] *= f
                for j in range(k):
                    st[2 + j] *= f
                st[0] = max(st[0], t)
            cnt = st[1]
            out[i, 0] = math.log1p(cnt)
            if cnt > 0:
                for j in range(k):
                    out[i, 1 + j] = st[2 + j] / cnt
            st[1] = cnt + 1.0
            row = vals[i]
            for j in range(k):
                st[2 + j] += row[j]
            self._dirty.add(key)
        self._evict(now if batch.times is None else max(times, default=now))
        return out

    def _evict(self, now: float) -> None:
        ents = self.entities
        while ents:
            key, st = next(iter(ents.items()))
            if len(ents) <= self.max_entities and now - st[0] <= self.ttl_s:
                break
            del ents[key]
            self.upto.pop(key, None)
            self.evicted += 1
            self._dirty.discard(key)
            self._evicted.add(key)

    def state(self) -> dict[str, dict[str, Any] | None]:
        out: dict[str, dict[str, Any] | None] = {k: None for k in self._evicted}
        for k in self._dirty:
            out[k] = {"s": self.entities[k], "o": self.upto.get(k, 0)}
        self._dirty.clear()
        self._evicted.clear()
        return out

    def load_state(self, suffix: str, state: dict[str, Any]) -> None:
        s = state.get("s")
        if isinstance(s, list) and len(s) == 2 + len(self.inputs):
            self.entities[suffix] = [float(v) for v in s]
            if "o" in state:
                self.upto[suffix] = int(state["o"])


def make_extractor(spec: FeatureSpec, clock: Callable[[], float] = time.time) -> FeatureExtractor:
    """The extractor a :class:`~stream_mtl.topology.FeatureSpec` declares."""
    if spec.kind == "standardize":
        return RunningStandardizer(spec.inputs)
    if spec.kind == "hash":
        return CategoricalHasher(spec.inputs, dim=spec.width)
    if spec.kind == "text":
        return TextHasher(spec.inputs[0], dim=spec.width, name=spec.name)
    return EntityAggregate(spec.key or "", spec.inputs, spec.window_s, spec.ttl_s, spec.max_entities, clock=clock)


class FeatureSet:
    """The extractors of one source partition: each runs once per batch; tasks share the result.

    Columns of features that this source does not compute stay zero. Table keys are
    ``<kind>:<feature>:<topic>:<partition>[:<entity>]`` so a partition's owner is the only writer.
    """

    def __init__(
        self, topology: Topology, source: str, topic: str, partition: int, clock: Callable[[], float] = time.time
    ):
        self.topology = topology
        self.prefix = f"{topic}:{partition}"
        self.slices = topology.feature_slices()
        self.extractors: dict[str, FeatureExtractor] = {
            f.name: make_extractor(f, clock) for f in topology.features_of(source)
        }
        self._kind = {f.name: f.kind for f in topology.features}
        self._full = len(self.extractors) == len(topology.features)

    def key(self, feature: str, suffix: str = "") -> str:
        base = f"{self._kind[feature]}:{feature}:{self.prefix}"
        return f"{base}:{suffix}" if suffix else base

    def transform(self, batch: RawBatch) -> np.ndarray:
        """The shared feature matrix ``[n, input_dim]`` (float32) of one batch."""
        parts = {name: ex.update_transform(batch) for name, ex in self.extractors.items()}
        if self._full and len(parts) == 1:
            return next(iter(parts.values()))
        x = np.zeros((len(batch), self.topology.input_dim), dtype=np.float32)
        for name, cols in parts.items():
            x[:, self.slices[name]] = cols
        return x

    def table_updates(self) -> dict[str, dict[str, Any] | None]:
        """Changed state since the last call: table key → value (``None``: delete)."""
        out: dict[str, dict[str, Any] | None] = {}
        for name, ex in self.extractors.items():
            for suffix, st in ex.state().items():
                out[self.key(name, suffix)] = st
        return out

    def load(self, items: list[tuple[str, Any]]) -> int:
        """Restore state from feature-table items of this partition; returns the keys loaded."""
        loaded = 0
        for name, ex in self.extractors.items():
            base = self.key(name)
            for k, v in items:
                if not isinstance(v, dict):
                    continue
                if k == base:
                    ex.load_state("", v)
                    loaded += 1
                elif k.startswith(base + ":"):
                    ex.load_state(k[len(base) + 1 :], v)
                    loaded += 1
        return loaded

    def counts(self) -> dict[str, int]:
        """Events counted by each running standardiser (its ``n``)."""
        return {self.key(n): ex.n for n, ex in self.extractors.items() if isinstance(ex, RunningStandardizer)}
