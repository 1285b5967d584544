"""Shared features: exact running statistics, hashing, text, bounded entity state, once per event."""

from __future__ import annotations

import numpy as np

from stream_mtl.features import (
    CategoricalHasher,
    EntityAggregate,
    FeatureSet,
    RawBatch,
    RunningStandardizer,
    TextHasher,
)
from stream_mtl.pipeline import IngestStage
from stream_mtl.topology import EventSchema, FeatureSpec, TaskSpec, Topology


def _batch(numeric: np.ndarray, columns: list[str], events: list[dict] | None = None, times=None) -> RawBatch:
    return RawBatch(events or [{} for _ in range(len(numeric))], numeric, columns, times)


def test_batch_merge_equals_full_statistics() -> None:
    rng = np.random.default_rng(1)
    data = rng.normal(3.0, 2.0, size=(1000, 4))
    s = RunningStandardizer(["a", "b", "c", "d"])
    for chunk in np.array_split(data, 17):
        s.update(chunk)
    np.testing.assert_allclose(s.mean, data.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(s.std, data.std(axis=0), rtol=1e-6)


def test_state_round_trip_continues_identically() -> None:
    rng = np.random.default_rng(2)
    cols = ["a", "b", "c"]
    a, b = RunningStandardizer(cols), RunningStandardizer(cols)
    a.update_transform(_batch(rng.normal(size=(10, 3)), cols))
    b.load_state("", a.state()[""])
    nxt = _batch(rng.normal(size=(5, 3)), cols)
    np.testing.assert_array_equal(a.update_transform(nxt), b.update_transform(nxt))


def test_hashing_is_stable_and_sparse() -> None:
    h = CategoricalHasher(["country"], dim=64)
    evs = [{"country": "DE"}, {"country": "DE"}, {"country": "FR"}]
    out = h.update_transform(_batch(np.zeros((3, 0)), [], evs))
    assert out.shape == (3, 64)
    np.testing.assert_array_equal(out[0], out[1])  # same value, same bucket
    assert np.count_nonzero(out[0]) == 1 and np.abs(out).sum() == 3


def test_text_vectoriser_keeps_tokens_for_reuse() -> None:
    t = TextHasher("body", dim=128, name="text")
    batch = _batch(np.zeros((2, 0)), [], [{"body": "Great food, great staff"}, {"body": ""}])
    out = t.update_transform(batch)
    assert batch.tokens["text"][0] == ["great", "food", "great", "staff"]
    np.testing.assert_allclose(np.linalg.norm(out[0]), 1.0, rtol=1e-6)
    assert not out[1].any()  # empty text: a zero vector, not NaN


def test_entity_aggregate_is_point_in_time_and_bounded() -> None:
    agg = EntityAggregate("user", ["amount"], window_s=10.0, ttl_s=100.0, max_entities=2)
    evs = [{"user": u} for u in ("a", "a", "b", "c")]
    out = agg.update_transform(_batch(np.array([[1.0], [3.0], [5.0], [7.0]]), ["amount"], evs, np.zeros(4)))
    assert out[0].tolist() == [0.0, 0.0]  # nothing seen before the first event
    np.testing.assert_allclose(out[1], [np.log1p(1.0), 1.0])  # one earlier event, mean 1
    assert len(agg.entities) == 2 and "a" not in agg.entities  # max_entities: least recent evicted
    state = agg.state()
    assert state["a"] is None and set(state) == {"a", "b", "c"}  # the eviction is a table delete
    # decay: 10 s later (one half-life) the count has halved
    later = agg.update_transform(_batch(np.array([[0.0]]), ["amount"], [{"user": "c"}], np.array([10.0])))
    np.testing.assert_allclose(later[0, 0], np.log1p(0.5), rtol=1e-6)
    # TTL: an entity idle for longer than ttl_s is dropped
    agg.update_transform(_batch(np.array([[0.0]]), ["amount"], [{"user": "d"}], np.array([500.0])))
    assert list(agg.entities) == ["d"]


def _topology(**task_overrides: object) -> Topology:
    return Topology(
        name="feat",
        schema=EventSchema(fields={"x": "float", "y": "float", "who": "str", "note": "str", "a": "bool", "b": "bool"}),
        features=[
            FeatureSpec(name="num", inputs=["x", "y"]),
            FeatureSpec(name="cat", kind="hash", inputs=["who"], dim=8),
            FeatureSpec(name="text", kind="text", inputs=["note"], dim=16),
            FeatureSpec(name="per_user", kind="entity", key="who", inputs=["x"]),
        ],
        tasks=[TaskSpec(name="a", kind="binary", label="a"), TaskSpec(name="b", kind="binary", label="b")],
    )


class _Rec:
    def __init__(self, offset: int, value: bytes):
        self.topic, self.partition, self.offset, self.key, self.value = "feat.events", 0, offset, None, value


def test_each_extractor_runs_once_per_event_however_many_tasks() -> None:
    import orjson

    topo = _topology()
    stage = IngestStage(topo)
    evs = [{"id": f"e{i}", "x": float(i), "y": 1.0, "who": "u", "note": "hi there", "a": True, "b": False}
           for i in range(10)]  # fmt: skip
    out = stage.process({0: [_Rec(i, orjson.dumps(e)) for i, e in enumerate(evs)]})
    assert [b.task for b in out.batches] == ["a", "b"]  # two tasks read the features …
    fs = stage.feature_set("feat.events", 0)
    assert {name: ex.calls for name, ex in fs.extractors.items()} == {"num": 1, "cat": 1, "text": 1, "per_user": 1}
    assert fs.extractors["num"].n == 10  # … computed once: ten events counted once each
    assert out.batches[0].x.shape == (10, topo.input_dim) == (10, 2 + 8 + 16 + 2)
    assert out.batches[0].x is out.batches[1].x  # the very same matrix, shared
    assert set(out.table_updates) == {"standardize:num:feat.events:0", "entity:per_user:feat.events:0:u"}


def test_feature_set_restores_from_table_items() -> None:
    topo = _topology()
    a = FeatureSet(topo, "events", "feat.events", 0)
    batch = _batch(np.array([[1.0, 2.0], [3.0, 4.0]]), ["x", "y"], [{"who": "u", "note": ""}] * 2, np.zeros(2))
    a.transform(batch)
    items = [(k, v) for k, v in a.table_updates().items() if v is not None]
    b = FeatureSet(topo, "events", "feat.events", 0)
    assert b.load(items) == 2
    assert b.extractors["num"].n == 2 and "u" in b.extractors["per_user"].entities
    assert FeatureSet(topo, "events", "feat.events", 1).load(items) == 0  # another partition's keys


def test_feature_version_changes_with_a_definition() -> None:
    topo = _topology()
    changed = topo.model_copy(
        update={"features": [*topo.features[:1], FeatureSpec(name="cat", kind="hash", inputs=["who"], dim=16)]}
    )
    assert topo.feature_version() != changed.feature_version()
    assert topo.feature_version() == _topology().feature_version()


def test_replayed_records_are_not_counted_twice() -> None:
    """After a crash a poll is read again: state tagged with its source offsets folds each record in once."""
    topo = _topology()
    rng = np.random.default_rng(5)
    users = ["u1", "u2", "u3"]
    evs = [{"who": users[i % 3], "note": ""} for i in range(30)]
    numeric, times = rng.normal(size=(30, 2)), np.arange(30, dtype=np.float64)

    def batch(lo: int, hi: int) -> RawBatch:
        return RawBatch(evs[lo:hi], numeric[lo:hi], ["x", "y"], times[lo:hi], offsets=np.arange(lo, hi) + 100)

    once = FeatureSet(topo, "events", "feat.events", 0)
    for lo in (0, 10, 20):
        once.transform(batch(lo, lo + 10))
    # a crashed worker had applied offsets 100..119 and written its state; its successor reads 110..129 again
    crashed = FeatureSet(topo, "events", "feat.events", 0)
    crashed.transform(batch(0, 10))
    crashed.transform(batch(10, 20))
    items = [(k, v) for k, v in crashed.table_updates().items() if v is not None]
    again = FeatureSet(topo, "events", "feat.events", 0)
    again.load(items)
    x_replayed = again.transform(batch(10, 20))
    again.transform(batch(20, 30))
    a, b = once.extractors["num"], again.extractors["num"]
    assert (a.n, b.n, b.upto) == (30, 30, 130)
    np.testing.assert_allclose(b.mean, a.mean, rtol=1e-12)
    np.testing.assert_allclose(b.m2, a.m2, rtol=1e-12)
    ea, eb = once.extractors["per_user"], again.extractors["per_user"]
    assert ea.entities.keys() == eb.entities.keys()
    for user in users:
        np.testing.assert_allclose(eb.entities[user], ea.entities[user], rtol=1e-12)
        assert eb.upto[user] == ea.upto[user]
    # the replayed rows are still featurised (with the state as it is now), only not folded in again
    assert x_replayed.shape == (10, topo.input_dim) and np.isfinite(x_replayed).all()


def test_records_without_offsets_always_update() -> None:
    s = RunningStandardizer(["a"])
    b = _batch(np.ones((4, 1)), ["a"])
    s.update_transform(b)
    s.update_transform(b)
    assert s.n == 8 and s.upto == 0
