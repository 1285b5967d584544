"""Route validated, featurised events to one batch per task whose label is present.

A task whose label is missing (absent or null) for an event gets no example for it: the
task is masked, never given a made-up label.

>>> import numpy as np
>>> from stream_mtl.topology import EventSchema, FeatureSpec, TaskSpec, Topology
>>> topo = Topology(name="toy", schema=EventSchema(fields={"x": "float", "a": "bool", "b": "float"}),
...                 features=[FeatureSpec(name="n", inputs=["x"])],
...                 tasks=[TaskSpec(name="a", kind="binary", label="a"),
...                        TaskSpec(name="b", kind="regression", label="b")])
>>> evs = [{"id": "1", "x": 0.0, "a": True}, {"id": "2", "x": 1.0, "a": False, "b": 2.5}]
>>> out = route(evs, [7, 8], np.zeros((2, 1), np.float32), topo, source="s:0")
>>> [(b.task, b.ids, b.y, b.offsets) for b in out]
[('a', ['1', '2'], [1.0, 0.0], {'s:0': [7, 8]}), ('b', ['2'], [2.5], {'s:0': [8, 8]})]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stream_mtl.codec import TaskBatch
from stream_mtl.topology import Topology

__all__ = ["route"]


def route(
    events: list[dict[str, Any]],
    offsets: list[int],
    x: np.ndarray,
    topology: Topology,
    source: str,
    feature_version: str = "",
    columns: dict[str, list[Any]] | None = None,
) -> list[TaskBatch]:
    """One :class:`TaskBatch` per task that has at least one labelled event in the batch.

    ``events`` come from one source partition (``source`` is ``"topic:partition"``) in offset
    order, so each batch's lineage is the offset range of its first and last example.
    ``columns`` may hold the label columns already read by validation.
    """
    id_field = topology.schema.id_field
    ids = [str(ev[id_field]) for ev in events]
    out: list[TaskBatch] = []
    for task in topology.tasks:
        label = task.label
        labels = columns[label] if columns and label in columns else [ev.get(label) for ev in events]
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
            sub_y = [float(v) for v in sub_y]
        out.append(
            TaskBatch(
                task=task.name,
                ids=sub_ids,
                x=sub_x,
                y=sub_y,
                feature_version=feature_version,
                offsets={source: [offsets[rows[0]], offsets[rows[-1]]]},
            )
        )
    return out
