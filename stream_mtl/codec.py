"""Wire formats: orjson for events, a compact binary frame for batched envelopes.

Internal topics carry *batches*: one Kafka message holds many events of one task, so
Faust's per-message dispatch is paid once per batch, not once per event. A frame is
``b"SMT1" | u32 header length | orjson header | float32 feature matrix (C order)``, followed
by the augmented training copy of the matrix when the task has one. A task topic carries two
kinds of frame: ``examples`` (events to predict and, when labelled, learn from) and
``labels`` (late labels for events seen before: ids, values, label times, metadata; no matrix).

>>> import numpy as np
>>> env = TaskBatch(task="t", ids=["a", "b"], x=np.ones((2, 3), np.float32), y=[1.0, 0.0],
...                 feature_version="f1", offsets={"src:0": [10, 11]})
>>> back = decode_batch(encode_batch(env))
>>> back.task, back.ids, back.x.shape, back.y, back.offsets
('t', ['a', 'b'], (2, 3), [1.0, 0.0], {'src:0': [10, 11]})
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

__all__ = [
    "CodecError",
    "PredictionBatch",
    "TaskBatch",
    "decode_batch",
    "dumps",
    "encode_batch",
    "label_batch",
    "loads",
]

MAGIC = b"SMT1"
_LEN = struct.Struct(">I")

dumps = orjson.dumps
loads = orjson.loads


class CodecError(ValueError):
    """A frame on an internal topic is not a stream_mtl batch."""


@dataclass
class TaskBatch:
    """Examples of one task, routed together: ids, shared features, labels, lineage."""

    task: str
    ids: list[str]
    x: np.ndarray  # float32 [n, d], the shared features
    y: list[Any]  # labels, one per id
    feature_version: str = ""
    offsets: dict[str, list[int]] = field(default_factory=dict)  # "topic:partition" -> [first, last]
    ts: list[float] | None = None  # examples: event times; labels: label times
    round: str = ""  # the poll this batch came from: the trainer mixes a whole round at once
    round_size: int = 0  # how many task batches that poll produced
    x_train: np.ndarray | None = None  # augmented training copy of ``x`` (never predicted)
    kind: str = "examples"  # or "labels"
    meta: list[Any] | None = None  # labels: per-label metadata (source, …)
    #: the source (or labels) partition it came from; not on the wire: ingest sends the frame to that
    #: partition of the task topic, so a task's frames spread over its partitions like the source's do
    partition: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def encode_batch(batch: TaskBatch) -> bytes:
    """Serialise a :class:`TaskBatch` to one message value."""
    x = np.ascontiguousarray(batch.x, dtype=np.float32)
    header = orjson.dumps(
        {
            "task": batch.task,
            "ids": batch.ids,
            "y": batch.y,
            "n": int(x.shape[0]),
            "d": int(x.shape[1]) if x.ndim == 2 else 0,
            "fv": batch.feature_version,
            "off": batch.offsets,
            "ts": batch.ts,
            "r": batch.round,
            "rn": batch.round_size,
            "k": batch.kind,
            "m": batch.meta,
            "xt": batch.x_train is not None,
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    parts = [MAGIC, _LEN.pack(len(header)), header, x.tobytes()]
    if batch.x_train is not None:
        parts.append(np.ascontiguousarray(batch.x_train, dtype=np.float32).tobytes())
    return b"".join(parts)


def label_batch(task: str, ids: list[str], values: list[Any], ts: list[float], meta: list[Any]) -> TaskBatch:
    """A ``labels`` frame: late labels of one task."""
    return TaskBatch(task, ids, np.zeros((len(ids), 0), np.float32), values, ts=ts, kind="labels", meta=meta)


def decode_batch(data: bytes, copy: bool = True) -> TaskBatch:
    """Parse a message value written by :func:`encode_batch`.

    ``copy=False`` returns read-only matrices that are views of ``data`` (no second copy).
    """
    if len(data) < 8 or data[:4] != MAGIC:
        raise CodecError("not a stream_mtl batch frame (bad magic)")
    (hlen,) = _LEN.unpack_from(data, 4)
    try:
        header = orjson.loads(data[8 : 8 + hlen])
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"bad batch header: {exc}") from None
    n, d = header["n"], header["d"]
    payload = memoryview(data)[8 + hlen :]
    copies = 2 if header.get("xt") else 1
    if len(payload) != copies * n * d * 4:
        raise CodecError(f"batch payload is {len(payload)} bytes, expected {copies * n * d * 4}")
    both = np.frombuffer(bytearray(payload) if copy else payload, dtype=np.float32)  # a copy is writable (torch)
    x = both[: n * d].reshape(n, d)
    x_train = both[n * d :].reshape(n, d) if copies == 2 else None
    return TaskBatch(
        task=header["task"],
        ids=header["ids"],
        x=x,
        y=header["y"],
        feature_version=header["fv"],
        offsets=header["off"],
        ts=header["ts"],
        round=header.get("r", ""),
        round_size=header.get("rn", 0),
        x_train=x_train,
        kind=header.get("k", "examples"),
        meta=header.get("m"),
    )


@dataclass
class PredictionBatch:
    """The predictions of one task batch, as written to ``<app>.predictions`` (columnar JSON).

    >>> pb = PredictionBatch("t", "abc-3", ["e1", "e2"], [True, False], [0.9, 0.2])
    >>> list(PredictionBatch.from_json(pb.to_json()).rows())[0]
    {'id': 'e1', 'task': 't', 'prediction': True, 'score': 0.9, 'model_version': 'abc-3'}
    """

    task: str
    model_version: str
    ids: list[str]
    predictions: list[Any]
    scores: list[Any]

    def __len__(self) -> int:
        return len(self.ids)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "task": self.task,
                "model_version": self.model_version,
                "ids": self.ids,
                "predictions": self.predictions,
                "scores": self.scores,
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> PredictionBatch:
        d = orjson.loads(data)
        return cls(d["task"], d["model_version"], d["ids"], d["predictions"], d["scores"])

    def rows(self) -> Iterator[dict[str, Any]]:
        """One dict per event: ``id``, ``task``, ``prediction``, ``score``, ``model_version``."""
        for eid, pred, score in zip(self.ids, self.predictions, self.scores, strict=True):
            yield {
                "id": eid,
                "task": self.task,
                "prediction": pred,
                "score": score,
                "model_version": self.model_version,
            }
