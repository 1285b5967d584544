"""Sample events for the checks: the first events of a topology's producer, or random ones fitting its schema."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from stream_mtl.testing.driver import START_TIME
from stream_mtl.topology import Topology, TopologyError, load_producer, load_topology, resolve_topology_path

__all__ = ["DEFAULT_SAMPLE", "sample_events", "synthetic_events"]

#: Sample events used by the checks when none are given.
DEFAULT_SAMPLE = 300

_WORDS = ("good", "bad", "fast", "slow", "fine", "great", "poor", "quick", "item", "order", "price", "ship")


def synthetic_events(topology: Topology, n: int = DEFAULT_SAMPLE, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` random events that fit a topology's schema (for a topology without a producer).

    Every field is present with a value of its type; a task's label has its kind's type (bool,
    number, class index, 0/1 list); entity keys repeat; text fields are a few words. Several
    sources take turns (``"_source"``). Half the labels of a task with late labels are sent late,
    as ``{"_label": ...}`` items ten events after their event.

    >>> from stream_mtl.synthetic import SyntheticStream, synthetic_topology
    >>> evs = synthetic_events(synthetic_topology(SyntheticStream(n_features=2, n_binary=1, n_regression=0)), 2)
    >>> sorted(evs[0]), type(evs[0]["y0"]).__name__
    (['f0', 'f1', 'id', 'y0'], 'bool')
    """
    rng = np.random.default_rng(seed)
    schema = topology.schema
    labels = {t.label: t for t in reversed(topology.tasks)}  # a field shared by tasks: the first one's kind
    late = [t for t in topology.tasks if t.label_ttl_s is not None]
    keys = {f.key for f in topology.features if f.kind == "entity"}
    out: list[dict[str, Any]] = []
    waiting: deque[tuple[int, dict[str, Any]]] = deque()
    for i in range(n):
        ev: dict[str, Any] = {schema.id_field: f"{topology.name}-{i}"}
        if len(topology.sources) > 1:
            ev["_source"] = topology.sources[i % len(topology.sources)]
        for name, typ in schema.fields.items():
            if name == schema.time_field:
                ev[name] = START_TIME + i if typ == "float" else int(START_TIME) + i
            elif name in labels:
                ev[name] = _label_value(labels[name], rng)
            elif name in keys:
                k = int(rng.integers(0, 20))
                ev[name] = f"k{k}" if typ == "str" else k
            elif typ == "float":
                ev[name] = round(float(rng.normal()), 5)
            elif typ == "int":
                ev[name] = int(rng.integers(0, 100))
            elif typ == "bool":
                ev[name] = bool(rng.random() < 0.5)
            else:
                ev[name] = " ".join(str(w) for w in rng.choice(_WORDS, size=int(rng.integers(3, 13))))
        for task in late:
            if ev.get(task.label) is not None and rng.random() < 0.5:
                value = ev.pop(task.label)
                waiting.append((i + 10, {"_label": {"id": ev[schema.id_field], "task": task.name, "value": value}}))
        out.append(ev)
        while waiting and waiting[0][0] <= i:
            out.append(waiting.popleft()[1])
    out.extend(item for _, item in waiting)
    return out


def _label_value(task: Any, rng: np.random.Generator) -> Any:
    if task.kind == "binary":
        return bool(rng.random() < 0.5)
    if task.kind == "regression":
        return round(float(rng.normal()), 5)
    if task.kind == "multiclass":
        return int(rng.integers(0, task.output_dim))
    return [int(v) for v in rng.integers(0, 2, size=task.output_dim)]


def sample_events(ref: str | Path, n: int = DEFAULT_SAMPLE, seed: int = 0) -> tuple[list[dict[str, Any]], str]:
    """The first ``n`` events of the topology's ``producer.py`` (late labels among them), or
    :func:`synthetic_events` when it has none; and where they came from."""
    from stream_mtl.produce import _take

    topology = load_topology(ref)
    try:
        events = load_producer(ref)
    except TopologyError:
        return synthetic_events(topology, n, seed), f"{n} synthetic events (no producer.py)"
    path = resolve_topology_path(ref).parent / "producer.py"
    return _take(events(), n), f"the first {n} events of {_shown(path)}"


def _shown(path: Path) -> str:
    """A path relative to the working directory when it is under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
