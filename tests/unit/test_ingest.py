"""Decode and validation: every bad record becomes a dead letter with a reason and its bytes."""

from types import SimpleNamespace

import orjson

from stream_mtl.ingest import EventValidator, ingest_records
from stream_mtl.produce import malformed_payloads
from stream_mtl.topology import EventSchema, FeatureSpec, TaskSpec, Topology

TOPO = Topology(
    name="toy",
    schema=EventSchema(fields={"x": "float", "k": "int", "y": "bool", "r": "float", "note": "str"}),
    features=[FeatureSpec(name="n", inputs=["x", "k"])],
    tasks=[TaskSpec(name="y", kind="binary", label="y"), TaskSpec(name="r", kind="regression", label="r")],
)


def rec(value: bytes | None, offset: int = 0) -> SimpleNamespace:
    return SimpleNamespace(topic="src", partition=2, offset=offset, key=b"k", value=value)


def test_valid_events_pass_with_offsets_and_label_columns() -> None:
    evs = [{"id": "a", "x": 1.0, "k": 2, "y": True}, {"id": 7, "x": 0, "k": 1, "r": 2.5, "note": "hi", "y": None}]
    out = ingest_records([rec(orjson.dumps(e), i) for i, e in enumerate(evs)], EventValidator(TOPO))
    assert out.events == evs and out.offsets == [0, 1] and not out.dead
    assert out.values == [(1.0, 2), (0, 1)]
    assert out.columns["y"] == [True, None] and out.columns["r"] == [None, 2.5]


def test_bad_label_in_a_column_dead_letters_only_that_event() -> None:
    evs = [
        {"id": "a", "x": 1.0, "k": 2, "y": True},
        {"id": "b", "x": 1.0, "k": 2, "y": "yes"},
        {"id": "c", "x": 1.0, "k": 2, "r": 1, "note": 5},
        {"id": "d", "x": 2.0, "k": 3, "y": 1},  # 0/1 is a valid binary label
    ]
    raws = [orjson.dumps(e) for e in evs]
    out = ingest_records([rec(r, i) for i, r in enumerate(raws)], EventValidator(TOPO))
    assert [e["id"] for e in out.events] == ["a", "d"] and out.offsets == [0, 3]
    assert out.columns["y"] == [True, 1] and out.values == [(1.0, 2), (2.0, 3)]
    assert [(d.offset, d.value) for d in out.dead] == [(1, raws[1]), (2, raws[2])]
    assert "label of binary task 'y'" in out.dead[0].reason and "field 'note'" in out.dead[1].reason


def test_reasons_name_the_field() -> None:
    v = EventValidator(TOPO)
    assert v.check({"id": "a", "x": 1.0}) == "field 'k': missing"
    assert v.check({"id": "a", "x": True, "k": 1}) == "field 'x': expected float, got bool"
    assert v.check({"x": 1.0, "k": 1}) == "field 'id': expected a string or integer event id, got null"
    assert "label of binary task 'y'" in v.check({"id": "a", "x": 1.0, "k": 1, "y": "yes"})
    assert "label of regression task 'r'" in v.check({"id": "a", "x": 1.0, "k": 1, "r": "2"})
    assert v.check({"id": "a", "x": 1.0, "k": 1, "note": 3}) == "field 'note': expected str, got int"
    assert v.check({"id": "a", "x": float("nan"), "k": 1}) == "field 'x': expected float, got float"


def test_every_malformed_kind_is_dead_lettered_with_original_bytes() -> None:
    bad = malformed_payloads(TOPO, 10)
    out = ingest_records([rec(b, i) for i, b in enumerate(bad)] + [rec(None, 99)], EventValidator(TOPO))
    assert not out.events
    assert [d.value for d in out.dead] == [*bad, None]
    for d in out.dead:
        headers = dict(d.headers())
        assert headers["reason"] and headers["stage"] in (b"ingest", b"validate")
        assert headers["source_topic"] == b"src" and headers["source_partition"] == b"2"
    assert {d.error_class for d in out.dead} == {"JSONDecodeError", "SchemaError"}
