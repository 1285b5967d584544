"""Late labels: parsed from ``<app>.labels`` at ingest, joined to pending examples in the trainer.

A label message is a JSON object ``{"id": <event id>, "task": <task>, "value": <label>,
"ts": <label time, optional>, "meta": <anything, optional>}``, keyed by the event id and
produced to the same partition number as its event (same key, same partition count), so
the event and its label meet in one worker. Malformed label messages go to the dead-letter
topic like malformed events.

The trainer predicts an event without its label when it arrives and keeps it in
:class:`PendingLabels` (bounded: rows, and a per-task TTL). A label that finds its event in
time is evaluated against the prediction made *before* it arrived and then learned from. A
label that overtakes its event (the two topics are read side by side) waits, bounded, for the
event up to the same TTL. A label that comes too late, never meets its event or comes twice
becomes an :class:`ExpiredLabel` on ``<app>.labels.expired`` with the reason. Nothing is
filled in and nothing is dropped silently.

>>> import numpy as np
>>> p = PendingLabels(max_rows=10, ttl={"t": 60.0}, clock=lambda: 100.0)
>>> _ = p.add("t", ["e1", "e2"], np.zeros((2, 3), np.float32), None, np.array([True, False]), {})
>>> hit = p.join("t", ["e2", "e9"], [1.0, 0.0], [101.0, 101.0], [None, None])
>>> hit.ids, hit.y, p.rows, p.early_rows            # e9 is not known yet: it waits for its event
(['e2'], [1.0], 1, 1)
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from stream_mtl.codec import TaskBatch, decode_batch, encode_batch, label_batch
from stream_mtl.ingest import DeadLetter, EventValidator, SourceRecord
from stream_mtl.topology import Topology

__all__ = ["ExpiredLabel", "JoinResult", "PendingLabels", "chunk_partition", "parse_labels"]


def chunk_partition(key: str) -> int:
    """The task-topic partition a pending-store key belongs to (its leading number; 0 for older keys).

    >>> chunk_partition("3:y0:1733.000000:7"), chunk_partition("3:y0:1733.000000:7:joined"), chunk_partition("y0:1.0:2")
    (3, 3, 0)
    """
    head = key.split(":", 1)[0]
    return int(head) if head.isdigit() else 0


def parse_labels(
    records: list[SourceRecord],
    topology: Topology,
    clock: Callable[[], float] = time.time,
    validator: EventValidator | None = None,
) -> tuple[list[TaskBatch], list[DeadLetter]]:
    """Label messages of one partition → one ``labels`` frame per task, and dead letters.

    ``validator`` (built once by the caller) checks label values against the task kinds.
    """
    validator = validator or EventValidator(topology)
    late = {t.name: t for t in topology.tasks if t.label_ttl_s is not None}
    per_task: dict[str, tuple[list[str], list[Any], list[float], list[Any]]] = {}
    dead: list[DeadLetter] = []
    now = clock()
    for rec in records:
        reason = None
        try:
            msg = orjson.loads(rec.value) if rec.value is not None else None
        except orjson.JSONDecodeError as exc:
            msg, reason = None, f"invalid JSON: {exc}"
        if reason is None:
            reason = _check_label(msg, late, validator)
        if reason is not None:
            dead.append(
                DeadLetter(rec.value, rec.key, "labels", "LabelError", reason, rec.topic, rec.partition, rec.offset)
            )
            continue
        task = late[msg["task"]]
        ids, vals, ts, meta = per_task.setdefault(task.name, ([], [], [], []))
        v = msg["value"]
        ids.append(str(msg["id"]))
        vals.append(float(v) if task.kind in ("binary", "regression") else v)
        t = msg.get("ts")
        ts.append(float(t) if type(t) in (int, float) else now)
        meta.append(msg.get("meta"))
    frames = [label_batch(task, *cols) for task, cols in per_task.items()]
    return frames, dead


def _check_label(msg: object, late: dict[str, Any], validator: EventValidator) -> str | None:
    if type(msg) is not dict:
        return "label message must be a JSON object with id, task and value"
    eid = msg.get("id")
    if type(eid) is not str and type(eid) is not int:
        return "field 'id': expected the event id (string or integer)"
    name = msg.get("task")
    if name not in late:
        known = ", ".join(late) or "none"
        return f"field 'task': {name!r} does not take late labels (tasks with label_ttl_s: {known})"
    if msg.get("value") is None:
        return "field 'value': missing"
    reason = validator.check_label(late[name].label, msg["value"])
    if reason:
        return reason.replace(f"field {late[name].label!r}", "field 'value'")
    ts = msg.get("ts")
    if ts is not None and (type(ts) not in (int, float) or ts != ts):
        return "field 'ts': expected a number (seconds since the epoch)"
    return None


@dataclass
class ExpiredLabel:
    """A label that could not be joined, as written to ``<app>.labels.expired``."""

    id: str
    task: str
    value: Any
    ts: float
    meta: Any
    reason: str  # "expired" | "unknown_event" | "duplicate"

    def to_json(self) -> bytes:
        return orjson.dumps(self.__dict__)


@dataclass
class JoinResult:
    """Labels of one frame joined to their pending examples, and those that were not."""

    ids: list[str] = field(default_factory=list)
    x: np.ndarray | None = None
    x_train: np.ndarray | None = None
    y: list[Any] = field(default_factory=list)
    decided: list[Any] = field(default_factory=list)  # the predictions made before the labels came
    delays: list[float] = field(default_factory=list)  # label time - arrival time
    meta: list[Any] = field(default_factory=list)  # each joined label's metadata
    expired: list[ExpiredLabel] = field(default_factory=list)


@dataclass
class _Chunk:
    key: str
    task: str
    ids: list[str]
    x: np.ndarray
    x_train: np.ndarray | None
    decided: np.ndarray
    at: float
    offsets: dict[str, list[int]]
    open: np.ndarray  # bool per row: still waiting
    seq: int = 0


def _encode_chunk(
    key: str,
    task: str,
    ids: list[str],
    x: np.ndarray,
    x_train: np.ndarray | None,
    decided: np.ndarray,
    at: float,
    offsets: dict[str, list[int]],
) -> bytes:
    batch = TaskBatch(
        task, ids, x, decided.tolist(), offsets=offsets, ts=[at], round=key, x_train=x_train, kind="pending"
    )
    return encode_batch(batch)


def _chunk(key: str, frame: bytes) -> _Chunk:
    """A chunk whose matrices are views of its frame: the table and the store share one copy."""
    b = decode_batch(frame, copy=False)
    return _Chunk(
        key,
        b.task,
        b.ids,
        b.x,
        b.x_train,
        np.asarray(b.y),
        float((b.ts or [0.0])[0]),
        b.offsets,
        np.ones(len(b.ids), dtype=bool),
    )


class PendingLabels:
    """Examples waiting for their late label: bounded by ``max_rows`` and a TTL per task.

    Storage is one chunk per routed batch (arrays, not per-row objects) plus an id index.
    :meth:`changes` gives the table writes that mirror it (chunk frames and the joined rows),
    so the state survives a restart through the table's changelog.
    """

    def __init__(self, max_rows: int, ttl: dict[str, float], clock: Callable[[], float] = time.time):
        self.max_rows = max_rows
        self.ttl = ttl
        self.clock = clock
        self._chunks: OrderedDict[str, _Chunk] = OrderedDict()
        #: task → event id → chunk sequence number << 24 | row (ints, not tuples: this is the big one)
        self._index: dict[str, dict[str, int]] = {t: {} for t in ttl}
        self._by_seq: dict[int, _Chunk] = {}
        self._seq = 0
        self.rows = 0
        self.counts: dict[str, dict[str, int]] = {t: _zero_counts() for t in ttl}
        self._changes: dict[str, bytes | None] = {}
        #: (task, id) of labels already used (bounded like the rows), to tell a duplicate from an unknown id
        self._joined: dict[str, OrderedDict[str, None]] = {t: OrderedDict() for t in ttl}
        #: how many used label ids each task remembers (a duplicate older than that reads as unknown)
        self._joined_cap = max(1, max_rows // 10 // max(1, len(ttl)))
        #: labels that arrived before their event: (task, id) → (value, label ts, meta, arrival)
        self._early: OrderedDict[tuple[str, str], tuple[Any, float, Any, float]] = OrderedDict()
        self._early_overflow: list[ExpiredLabel] = []

    def add(
        self,
        task: str,
        ids: list[str],
        x: np.ndarray,
        x_train: np.ndarray | None,
        decided: np.ndarray,
        offsets: dict[str, list[int]],
        key: str | None = None,
        partition: int = 0,
    ) -> str:
        """Keep unlabelled, already predicted rows of one task until their labels arrive; the key ("": none
        new, every row was waiting already).

        ``partition``: the task-topic partition the rows came from; it leads the key (:func:`chunk_partition`),
        so the state of one partition can be written to, and restored from, that changelog partition.
        """
        index = self._index.get(task)
        if index and not index.keys().isdisjoint(ids):  # a frame read again: waiting rows keep their first prediction
            fresh = [i for i, eid in enumerate(ids) if eid not in index]
            if len(fresh) < len(ids):
                self.counts.setdefault(task, _zero_counts())["replayed"] += len(ids) - len(fresh)
                if not fresh:
                    return ""
                ids, x, decided = [ids[i] for i in fresh], x[fresh], np.asarray(decided)[fresh]
                x_train = None if x_train is None else x_train[fresh]
        self._seq += 1
        key = key or f"{partition}:{task}:{self.clock():.6f}:{self._seq}"
        frame = _encode_chunk(key, task, ids, x, x_train, np.asarray(decided), self.clock(), offsets)
        self._insert(_chunk(key, frame))
        self._changes[key] = frame
        self.counts[task]["added"] += len(ids)
        self._bound()
        return key

    def _insert(self, ch: _Chunk) -> None:
        self._chunks[ch.key] = ch
        self._seq += 1
        ch.seq = self._seq
        self._by_seq[ch.seq] = ch
        index = self._index.setdefault(ch.task, {})
        base = ch.seq << 24
        for i, eid in enumerate(ch.ids):
            if ch.open[i]:
                index[eid] = base | i
        self.rows += int(ch.open.sum())

    def join(self, task: str, ids: list[str], values: list[Any], label_ts: list[float], meta: list[Any]) -> JoinResult:
        """Join a frame of late labels; the unmatched ones come back as expired with a reason."""
        res = JoinResult()
        now = self.clock()
        ttl = self.ttl.get(task, 0.0)
        rows_x, rows_xt = [], []
        touched: set[str] = set()
        c = self.counts.setdefault(task, _zero_counts())
        index = self._index.setdefault(task, {})
        for eid, v, ts, m in zip(ids, values, label_ts, meta, strict=True):
            hit = index.pop(eid, None)
            if hit is None:
                if self._was_joined(task, eid) or (task, eid) in self._early:
                    res.expired.append(ExpiredLabel(eid, task, v, ts, m, "duplicate"))
                    c["duplicate"] += 1
                else:
                    self._early[(task, eid)] = (v, ts, m, now)
                    c["early"] += 1
                    self._bound_early()
                continue
            ch = self._by_seq[hit >> 24]
            row = hit & 0xFFFFFF
            ch.open[row] = False
            self.rows -= 1
            touched.add(ch.key)
            self._remember(task, eid)
            if now - ch.at > ttl:
                res.expired.append(ExpiredLabel(eid, task, v, ts, m, "expired"))
                c["expired"] += 1
                continue
            res.ids.append(eid)
            res.y.append(v)
            res.decided.append(ch.decided[row].tolist())
            res.delays.append(max(0.0, ts - ch.at))
            res.meta.append(m)
            rows_x.append(ch.x[row])
            if ch.x_train is not None:
                rows_xt.append(ch.x_train[row])
            c["joined"] += 1
        if rows_x:
            res.x = np.stack(rows_x).astype(np.float32, copy=False)
            res.x_train = np.stack(rows_xt) if len(rows_xt) == len(rows_x) else None
        for key in touched:
            self._touch(key)
        return res

    @property
    def early_rows(self) -> int:
        """Labels waiting for their event."""
        return len(self._early)

    def take_early(self, task: str, ids: list[str]) -> dict[int, tuple[Any, float, Any]]:
        """Labels that arrived before these events: row index → (value, label ts, meta); removed."""
        if not self._early:
            return {}
        out: dict[int, tuple[Any, float, Any]] = {}
        for i, eid in enumerate(ids):
            hit = self._early.pop((task, eid), None)
            if hit is not None:
                out[i] = hit[:3]
                self._remember(task, eid)
                self.counts.setdefault(task, _zero_counts())["joined"] += 1
        return out

    def _bound_early(self) -> None:
        while len(self._early) > self.max_rows:
            (task, eid), (v, ts, m, _) = self._early.popitem(last=False)
            self._early_overflow.append(ExpiredLabel(eid, task, v, ts, m, "unknown_event"))
            self.counts[task]["unknown_event"] += 1

    def _was_joined(self, task: str, eid: str) -> bool:
        return eid in self._joined.get(task, ())

    def _remember(self, task: str, eid: str) -> None:
        joined = self._joined.setdefault(task, OrderedDict())
        joined[eid] = None
        if len(joined) > self._joined_cap:
            joined.popitem(last=False)

    def _touch(self, key: str) -> None:
        ch = self._chunks[key]
        if not ch.open.any():
            self._retire(key)
        else:
            self._changes[key + ":joined"] = orjson.dumps(np.flatnonzero(~ch.open).tolist())

    def _retire(self, key: str, record: bool = True) -> None:
        ch = self._chunks.pop(key)
        del self._by_seq[ch.seq]
        index = self._index.get(ch.task, {})
        for i in np.flatnonzero(ch.open).tolist():
            index.pop(ch.ids[i], None)
        self.rows -= int(ch.open.sum())
        if record:
            self._changes[key] = None
            self._changes[key + ":joined"] = None

    def sweep(self) -> list[ExpiredLabel]:
        """Drop rows whose TTL passed without a label (counted), and early labels whose event never came.

        Returns those labels (reason ``unknown_event``) for ``<app>.labels.expired``.
        """
        now = self.clock()
        for key, ch in list(self._chunks.items()):
            if now - ch.at > self.ttl.get(ch.task, 0.0):
                self.counts[ch.task]["unlabelled_expired"] += int(ch.open.sum())
                self._retire(key)
        out, self._early_overflow = self._early_overflow, []
        while self._early:
            (task, eid), (v, ts, m, at) = next(iter(self._early.items()))
            if now - at <= self.ttl.get(task, 0.0):
                break
            del self._early[(task, eid)]
            out.append(ExpiredLabel(eid, task, v, ts, m, "unknown_event"))
            self.counts[task]["unknown_event"] += 1
        return out

    def _bound(self) -> None:
        while self.rows > self.max_rows and self._chunks:
            key, ch = next(iter(self._chunks.items()))
            self.counts[ch.task]["evicted"] += int(ch.open.sum())
            self._retire(key)

    def changes(self) -> dict[str, bytes | None]:
        """Table writes since the last call: key → value (``None``: delete)."""
        out, self._changes = self._changes, {}
        return out

    def drop_partitions(self, parts: set[tuple[str, int]]) -> int:
        """Forget the rows of these (task, partition)s without writing deletes (another worker owns them now)."""
        keys = [k for k, ch in self._chunks.items() if (ch.task, chunk_partition(k)) in parts]
        for key in keys:
            self._retire(key, record=False)
        return len(keys)

    def restore(self, items: list[tuple[str, bytes]], parts: set[tuple[str, int]] | None = None) -> int:
        """Rebuild from changelog items written by :meth:`changes`; returns the rows pending afterwards.

        ``parts``: the (task, partition)s the items are the whole state of; what the store held of them
        is replaced (default: add to it).
        """
        if parts:
            self.drop_partitions(parts)
        joined = {k[: -len(":joined")]: orjson.loads(v) for k, v in items if k.endswith(":joined") and v}
        for k, v in items:
            if k.endswith(":joined") or not v or k in self._chunks:
                continue
            ch = _chunk(k, v)
            for i in joined.get(k, []):
                ch.open[i] = False
                self._remember(ch.task, ch.ids[i])  # its label, read again, is a duplicate, not an early label
            if ch.open.any():
                self._insert(ch)
        return self.rows

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Counters per task, with the rows still pending."""
        pending: dict[str, int] = {t: 0 for t in self.counts}
        for ch in self._chunks.values():
            pending[ch.task] = pending.get(ch.task, 0) + int(ch.open.sum())
        early: dict[str, int] = {}
        for task, _ in list(self._early):
            early[task] = early.get(task, 0) + 1
        return {
            t: {**c, "pending": pending.get(t, 0), "waiting_for_event": early.get(t, 0)} for t, c in self.counts.items()
        }


def _zero_counts() -> dict[str, int]:
    return {
        "added": 0,
        "replayed": 0,
        "joined": 0,
        "early": 0,
        "expired": 0,
        "unknown_event": 0,
        "duplicate": 0,
        "unlabelled_expired": 0,
        "evicted": 0,
    }
