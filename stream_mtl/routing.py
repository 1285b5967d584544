"""Route validated, featurised events to one batch per task: segmentation, masks, text augmentation.

A task takes the events of its ``source`` that pass its ``where`` predicate and carry its
label. A task whose label is missing for an event gets no example for it (masked, never
filled in) — unless it accepts late labels, in which case the event is routed with a ``None``
label: the trainer predicts it now and keeps it pending until the label arrives.

A task restricted to some ``features`` sees the other columns as zeros. Text augmentation
(token dropout, synonym swap) re-vectorises the tokens the text feature already produced into
a training copy ``x_train``; predictions always use ``x``.

>>> import numpy as np
>>> from stream_mtl.topology import EventSchema, FeatureSpec, TaskSpec, Topology
>>> topo = Topology(name="toy", schema=EventSchema(fields={"x": "float", "a": "bool", "b": "float"}),
...                 features=[FeatureSpec(name="n", inputs=["x"])],
...                 tasks=[TaskSpec(name="a", kind="binary", label="a"),
...                        TaskSpec(name="b", kind="regression", label="b")])
>>> evs = [{"id": "1", "x": 0.0, "a": True}, {"id": "2", "x": 1.0, "a": False, "b": 2.5}]
>>> out = Router(topo).route(evs, [7, 8], np.zeros((2, 1), np.float32), "events", "s:0")
>>> [(b.task, b.ids, b.y, b.offsets) for b in out]
[('a', ['1', '2'], [1.0, 0.0], {'s:0': [7, 8]}), ('b', ['2'], [2.5], {'s:0': [8, 8]})]
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from stream_mtl.codec import TaskBatch
from stream_mtl.features import TextHasher
from stream_mtl.topology import SynonymSwap, TaskSpec, TokenDropout, Topology

__all__ = ["Router", "augment_tokens"]


def augment_tokens(
    tokens: list[list[str]], augs: list[TokenDropout | SynonymSwap], rng: np.random.Generator
) -> list[list[str]]:
    """Token dropout and synonym swap applied to copies of tokenised texts.

    >>> rng = np.random.default_rng(0)
    >>> augment_tokens([["good", "food"]], [SynonymSwap(feature="t", table={"good": ["great"]}, p=1.0)], rng)
    [['great', 'food']]
    """
    out = []
    for toks in tokens:
        cur = list(toks)
        for aug in augs:
            if isinstance(aug, TokenDropout):
                keep = rng.random(len(cur)) >= aug.p
                cur = [t for t, k in zip(cur, keep, strict=True) if k] or cur[:1]
            else:
                draws = rng.random(len(cur))
                cur = [
                    aug.table[t][int(d * 1e6) % len(aug.table[t])] if d < aug.p and aug.table.get(t) else t
                    for t, d in zip(cur, draws, strict=True)
                ]
        out.append(cur)
    return out


class _TaskRoute:
    """What routing needs of one task, compiled once."""

    def __init__(self, task: TaskSpec, topology: Topology, seed: int):
        self.task = task
        self.late = task.label_ttl_s is not None
        slices = topology.feature_slices()
        self.zero_cols: list[slice] = (
            [sl for name, sl in slices.items() if name not in task.features] if task.features is not None else []
        )
        text_augs: dict[str, list[Any]] = {}
        for aug in task.augment:
            if isinstance(aug, TokenDropout | SynonymSwap):
                text_augs.setdefault(aug.feature, []).append(aug)
        self.text_augs = text_augs
        self.text_slices = {name: slices[name] for name in text_augs}
        self.rng = np.random.default_rng(seed + zlib.crc32(task.name.encode()))

    def mask(self, x: np.ndarray) -> np.ndarray:
        if not self.zero_cols:
            return x
        x = x.copy()
        for sl in self.zero_cols:
            x[:, sl] = 0.0
        return x


class Router:
    """Splits the featurised events of one source partition into per-task batches."""

    def __init__(self, topology: Topology, text: dict[str, TextHasher] | None = None, seed: int = 0):
        self.topology = topology
        self.feature_version = topology.feature_version()
        self.text = text or {}
        #: (event index, task, exception) of the last :meth:`route` call's ``where`` predicates that raised
        self.failures: list[tuple[int, str, Exception]] = []
        self.by_source = {
            src: [_TaskRoute(t, topology, seed) for t in topology.tasks_of(src)] for src in topology.sources
        }

    def _where(self, where: Any, ev: dict[str, Any], i: int, task: str) -> bool:
        """A task's ``where`` predicate on one event; one that raises leaves the event out of the task and is
        recorded in :attr:`failures` (ingest dead-letters the event with the reason; the other tasks keep it)."""
        try:
            return bool(where(ev))
        except Exception as exc:  # the user's code: never a reason to stop the stream
            self.failures.append((i, task, exc))
            return False

    def route(
        self,
        events: list[dict[str, Any]],
        offsets: list[int],
        x: np.ndarray,
        source: str,
        source_id: str,
        columns: dict[str, list[Any]] | None = None,
        tokens: dict[str, list[list[str]]] | None = None,
    ) -> list[TaskBatch]:
        """One :class:`TaskBatch` per task with at least one example in the batch.

        ``events`` come from one source partition (``source_id`` is ``"topic:partition"``) in
        offset order, so each batch's lineage is the offset range of its first and last row.
        ``columns`` may hold the label columns already read by validation.
        """
        self.failures = []
        id_field = self.topology.schema.id_field
        ids = [str(ev[id_field]) for ev in events]
        out: list[TaskBatch] = []
        for tr in self.by_source[source]:
            task = tr.task
            label = task.label
            labels = columns[label] if columns and label in columns else [ev.get(label) for ev in events]
            where = task.where
            if where is not None:
                rows = [
                    i
                    for i, ev in enumerate(events)
                    if self._where(where, ev, i, task.name) and (tr.late or labels[i] is not None)
                ]
            elif tr.late:
                rows = list(range(len(events)))
            else:
                rows = [i for i, v in enumerate(labels) if v is not None]
            if not rows:
                continue
            if len(rows) == len(events):
                sub_x, sub_ids, sub_y = x, ids, labels
            else:
                sub_x = x[rows]
                sub_ids = [ids[i] for i in rows]
                sub_y = [labels[i] for i in rows]
            if task.kind in ("binary", "regression"):
                sub_y = [None if v is None else float(v) for v in sub_y]
            sub_x = tr.mask(sub_x)
            x_train = self._augment_text(tr, sub_x, rows, tokens) if tr.text_augs and tokens else None
            out.append(
                TaskBatch(
                    task=task.name,
                    ids=sub_ids,
                    x=sub_x,
                    y=sub_y,
                    feature_version=self.feature_version,
                    offsets={source_id: [offsets[rows[0]], offsets[rows[-1]]]},
                    x_train=x_train,
                )
            )
        return out

    def _augment_text(
        self, tr: _TaskRoute, x: np.ndarray, rows: list[int], tokens: dict[str, list[list[str]]]
    ) -> np.ndarray:
        x_train = x.copy()
        for feature, augs in tr.text_augs.items():
            toks = tokens.get(feature)
            hasher = self.text.get(feature)
            if toks is None or hasher is None:
                continue
            aug = augment_tokens([toks[i] for i in rows], augs, tr.rng)
            x_train[:, tr.text_slices[feature]] = hasher.vectorize(aug)
        return x_train
