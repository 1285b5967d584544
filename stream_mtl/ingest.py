"""Decode and validate raw source records; bad ones become dead letters, never silent drops.

The validator is compiled once from the topology's event schema. Feature inputs are required;
label fields may be missing or null (the task is then masked for that event) but must have the
declared type when present.

>>> from stream_mtl.topology import EventSchema, FeatureSpec, TaskSpec, Topology
>>> topo = Topology(name="toy", schema=EventSchema(fields={"x": "float", "y": "bool"}),
...                 features=[FeatureSpec(name="n", inputs=["x"])],
...                 tasks=[TaskSpec(name="t", kind="binary", label="y")])
>>> v = EventValidator(topo)
>>> v.check({"id": "e1", "x": 1.5, "y": True}) is None
True
>>> v.check({"id": "e2", "x": "1.5"})
"field 'x': expected float, got str"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import attrgetter, itemgetter
from typing import Any, Protocol

import orjson

from stream_mtl.topology import Topology

__all__ = ["DeadLetter", "EventValidator", "IngestResult", "SourceRecord", "ingest_records"]


class SourceRecord(Protocol):
    """What ingest needs of a consumed record (aiokafka's ``ConsumerRecord`` fits)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class DeadLetter:
    """A record that could not be processed, with the original bytes and why."""

    value: bytes | None
    key: bytes | None
    stage: str
    error_class: str
    reason: str
    topic: str
    partition: int
    offset: int

    def headers(self) -> list[tuple[str, bytes]]:
        """Kafka headers naming stage, error class, reason and source position."""
        return [
            ("stage", self.stage.encode()),
            ("error_class", self.error_class.encode()),
            ("reason", self.reason.encode()),
            ("source_topic", self.topic.encode()),
            ("source_partition", str(self.partition).encode()),
            ("source_offset", str(self.offset).encode()),
        ]


@dataclass
class IngestResult:
    """Valid events of one source partition, column by column, and its dead letters."""

    events: list[dict[str, Any]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    values: list[tuple[Any, ...]] = field(default_factory=list)  # feature inputs, one tuple per event
    columns: dict[str, list[Any]] = field(default_factory=dict)  # optional fields (labels …), None if absent
    dead: list[DeadLetter] = field(default_factory=list)


_NUMERIC = frozenset({float, int})
_ID_TYPES = frozenset({str, int})


def _is_number(v: object) -> bool:
    return (type(v) is float or type(v) is int) and v == v  # excludes bool and NaN


def _type_name(v: object) -> str:
    return "null" if v is None else type(v).__name__


class EventValidator:
    """Checks one decoded event against the topology's schema; returns a reason or None."""

    def __init__(self, topology: Topology, source: str | None = None):
        schema = topology.schema
        self.id_field = schema.id_field
        feats = topology.features_of(source) if source is not None else topology.features
        numeric: list[str] = []
        other: dict[str, tuple[frozenset[type], str]] = {}
        for f in feats:
            if f.kind in ("standardize", "entity"):
                numeric += [n for n in f.inputs if n not in numeric]
            if f.kind == "text":
                other[f.inputs[0]] = (frozenset({str}), "a string")
            if f.kind == "hash":
                for n in f.inputs:
                    other.setdefault(n, (frozenset({str, int, bool}), "a string, integer or bool"))
            if f.kind == "entity" and f.key is not None:
                other[f.key] = (frozenset({str, int}), "a string or integer entity key")
        if schema.time_field is not None and schema.time_field not in numeric:
            numeric.append(schema.time_field)
        #: numeric fields every event of this source must carry, in feature-matrix column order
        self.required = numeric
        self.required_types = [schema.fields[f] for f in self.required]
        #: non-numeric fields it must carry: name → (accepted types, description)
        self.required_other = other
        taken = set(self.required) | set(other)
        self.optional: list[tuple[str, str]] = [(name, typ) for name, typ in schema.fields.items() if name not in taken]
        self.labels = {t.label: t for t in topology.tasks}
        # fast path: one C-level itemgetter and a set of types instead of a Python loop per field
        if len(self.required) > 1:
            self._get = itemgetter(*self.required)
        elif self.required:
            first = self.required[0]
            self._get = lambda ev: (ev[first],)
        else:
            self._get = lambda ev: ()
        self._numeric_only = all(t in ("float", "int") for t in self.required_types)
        self._optional_types = dict(self.optional)
        self._fast_types_by_name = {name: self._fast_types(name, typ) | {type(None)} for name, typ in self.optional}

    def _fast_types(self, name: str, typ: str) -> frozenset[type]:
        task = self.labels.get(name)
        if task is not None:
            return frozenset({bool} if task.kind == "binary" else {float, int} if task.kind == "regression" else ())
        return frozenset({"str": {str}, "bool": {bool}}.get(typ, {float, int}))

    def values(self, ev: dict[str, Any]) -> tuple[Any, ...] | None:
        """The feature inputs of an event that is plainly valid; ``None`` means "ask :meth:`check`"."""
        if not self._numeric_only:
            return None
        try:
            vals = self._get(ev)
        except KeyError:
            return None
        if not _NUMERIC.issuperset(map(type, vals)):
            return None
        eid = ev.get(self.id_field)
        if type(eid) is not str and type(eid) is not int:
            return None
        for name, (types, _) in self.required_other.items():
            if type(ev.get(name)) not in types:
                return None
        return vals

    def check_optional_column(self, name: str, column: list[Any]) -> list[int]:
        """Indices of the events whose optional field ``name`` (a column of the batch) is invalid."""
        types = self._fast_types_by_name[name]
        if types.issuperset(map(type, column)):
            return []
        typ = self._optional_types[name]
        return [i for i, v in enumerate(column) if v is not None and self._check_optional(name, typ, v)]

    def check(self, ev: object) -> str | None:
        """``None`` when the event is valid, else a human-readable reason naming the field."""
        if type(ev) is not dict:
            return f"event must be a JSON object, got {_type_name(ev)}"
        eid = ev.get(self.id_field)
        if type(eid) is not str and type(eid) is not int:
            return f"field {self.id_field!r}: expected a string or integer event id, got {_type_name(eid)}"
        for name, typ in zip(self.required, self.required_types, strict=True):
            if name not in ev:
                return f"field {name!r}: missing"
            v = ev[name]
            if typ == "bool":
                if type(v) is not bool:
                    return f"field {name!r}: expected bool, got {_type_name(v)}"
            elif not _is_number(v):
                return f"field {name!r}: expected {typ}, got {_type_name(v)}"
        for name, (types, desc) in self.required_other.items():
            v = ev.get(name)
            if type(v) not in types:
                got = "missing" if v is None else f"expected {desc}, got {_type_name(v)}"
                return f"field {name!r}: {got}"
        for name, typ in self.optional:
            v = ev.get(name)
            if v is None:
                continue
            reason = self._check_optional(name, typ, v)
            if reason:
                return reason
        return None

    def check_label(self, label_field: str, v: object) -> str | None:
        """``None`` when ``v`` is a valid value of a task's label field, else the reason."""
        return self._check_optional(label_field, "", v)

    def _check_optional(self, name: str, typ: str, v: object) -> str | None:
        task = self.labels.get(name)
        if task is not None:
            kind = task.kind
            if kind == "binary" and not (type(v) is bool or (type(v) is int and v in (0, 1))):
                return f"field {name!r}: label of binary task {task.name!r} must be a bool or 0/1, got {v!r}"
            if kind == "regression" and not _is_number(v):
                return f"field {name!r}: label of regression task {task.name!r} must be a number, got {_type_name(v)}"
            if kind == "multiclass" and not (type(v) is int and 0 <= v < (task.n_classes or 2)):
                return f"field {name!r}: label of multiclass task {task.name!r} must be an int in [0, {task.n_classes})"
            if kind == "multilabel" and not (
                type(v) is list and len(v) == task.output_dim and all(x in (0, 1) for x in v)
            ):
                return f"field {name!r}: label of multilabel task {task.name!r} must be a 0/1 list of {task.output_dim}"
            return None
        if typ == "str" and type(v) is not str:
            return f"field {name!r}: expected str, got {_type_name(v)}"
        if typ == "bool" and type(v) is not bool:
            return f"field {name!r}: expected bool, got {_type_name(v)}"
        if typ in ("float", "int") and not _is_number(v):
            return f"field {name!r}: expected {typ}, got {_type_name(v)}"
        return None


_VALUE = attrgetter("value")


def ingest_records(records: list[SourceRecord], validator: EventValidator) -> IngestResult:
    """Decode (orjson) and validate records of one source partition, in offset order.

    A batch whose events are all plainly valid is decoded and checked column-wise in C-level
    passes (``map``, ``itemgetter``, one set of types per column); any other batch is checked
    event by event, so a bad record costs its own batch the slow path and nothing else.
    Optional fields such as labels are checked per column either way, and only a column that
    holds a wrong type is searched event by event.
    """
    out = _ingest_fast(records, validator)
    if out is None:
        out = _ingest_slow(records, validator)
    _check_columns(out, records, validator)
    return out


def _ingest_fast(records: list[SourceRecord], validator: EventValidator) -> IngestResult | None:
    if not validator._numeric_only:
        return None
    try:
        events = list(map(orjson.loads, map(_VALUE, records)))
    except orjson.JSONDecodeError:  # also a None value
        return None
    if not {dict}.issuperset(map(type, events)):
        return None
    getter = validator._get
    try:
        values = list(map(getter, events))
        ids = list(map(itemgetter(validator.id_field), events))
    except KeyError:
        return None
    if not _NUMERIC.issuperset(map(type, chain.from_iterable(values))) or not _ID_TYPES.issuperset(map(type, ids)):
        return None
    for name, (types, _) in validator.required_other.items():
        if not types.issuperset(map(type, map(dict.get, events, repeat(name)))):
            return None
    return IngestResult(events=events, values=values, offsets=[rec.offset for rec in records])


def _ingest_slow(records: list[SourceRecord], validator: EventValidator) -> IngestResult:
    out = IngestResult()
    loads = orjson.loads
    fast = validator.values
    for rec in records:
        raw = rec.value
        try:
            ev = loads(raw) if raw is not None else None
        except orjson.JSONDecodeError as exc:
            reason = f"invalid JSON: {exc}"
            out.dead.append(
                DeadLetter(raw, rec.key, "ingest", "JSONDecodeError", reason, rec.topic, rec.partition, rec.offset)
            )
            continue
        vals = fast(ev) if type(ev) is dict else None
        if vals is None:
            reason = "empty message value" if raw is None else validator.check(ev)
            if reason is not None:
                out.dead.append(
                    DeadLetter(raw, rec.key, "validate", "SchemaError", reason, rec.topic, rec.partition, rec.offset)
                )
                continue
            vals = tuple(float(ev[f]) for f in validator.required)  # type: ignore[index]
        out.events.append(ev)  # type: ignore[arg-type]
        out.values.append(vals)
        out.offsets.append(rec.offset)
    return out


def _check_columns(out: IngestResult, records: list[SourceRecord], validator: EventValidator) -> None:
    bad: set[int] = set()
    for name, _typ in validator.optional:
        column = list(map(dict.get, out.events, repeat(name)))
        out.columns[name] = column
        bad.update(validator.check_optional_column(name, column))
    if not bad:
        return
    by_offset = {rec.offset: rec for rec in records}
    for i in sorted(bad):
        rec = by_offset[out.offsets[i]]
        reason = validator.check(out.events[i]) or "invalid field"
        out.dead.append(
            DeadLetter(rec.value, rec.key, "validate", "SchemaError", reason, rec.topic, rec.partition, rec.offset)
        )
    keep = [i for i in range(len(out.events)) if i not in bad]
    out.events = [out.events[i] for i in keep]
    out.values = [out.values[i] for i in keep]
    out.offsets = [out.offsets[i] for i in keep]
    out.columns = {name: [col[i] for i in keep] for name, col in out.columns.items()}
