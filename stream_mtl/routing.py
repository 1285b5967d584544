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
>>> out = route(evs, [("s", 0, 7), ("s", 0, 8)], np.zeros((2, 1), np.float32), topo)
>>> [(b.task, b.ids, b.y) for b in out]
[('a', ['1', '2'], [1.0, 0.0]), ('b', ['2'], [2.5])]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stream_mtl.codec import TaskBatch
from stream_mtl.topology import Topology

__all__ = ["offset_ranges", "route"]


def offset_ranges(positions: list[tuple[str, int, int]]) -> dict[str, list[int]]:
    """``{"topic:partition": [first, last]}`` for a list of source positions (lineage)."""
    out: dict[str, list[int]] = {}
    for topic, partition, offset in positions:
        key = f"{topic}:{partition}"
        rng = out.get(key)
        if rng is None:
            out[key] = [offset, offset]
        else:
            rng[0] = min(rng[0], offset)
            rng[1] = max(rng[1], offset)
    return out


def _label_value(kind: str, v: Any) -> Any:
    if kind in ("binary", "regression"):
        return float(v)
    return v  # multiclass: int class index; multilabel: 0/1 list


def route(
    events: list[dict[str, Any]],
    positions: list[tuple[str, int, int]],
    x: np.ndarray,
    topology: Topology,
    feature_version: str = "",
) -> list[TaskBatch]:
    """One :class:`TaskBatch` per task that has at least one labelled event in the batch."""
    id_field = topology.schema.id_field
    ids = [str(ev[id_field]) for ev in events]
    out: list[TaskBatch] = []
    for task in topology.tasks:
        label = task.label
        rows = [i for i, ev in enumerate(events) if ev.get(label) is not None]
        if not rows:
            continue
        if len(rows) == len(events):
            sub_x, sub_ids, sub_pos = x, ids, positions
        else:
            sub_x = x[rows]
            sub_ids = [ids[i] for i in rows]
            sub_pos = [positions[i] for i in rows]
        out.append(
            TaskBatch(
                task=task.name,
                ids=sub_ids,
                x=sub_x,
                y=[_label_value(task.kind, events[i][label]) for i in rows],
                feature_version=feature_version,
                offsets=offset_ranges(sub_pos),
            )
        )
    return out
