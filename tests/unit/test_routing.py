"""Per-task segmentation (source, predicate, label presence), feature masks and text augmentation."""

from __future__ import annotations

import numpy as np
import orjson

from stream_mtl.pipeline import IngestStage
from stream_mtl.topology import EventSchema, FeatureSpec, SynonymSwap, TaskSpec, TokenDropout, Topology
from stream_mtl.trainer import Trainer


def is_long(ev: dict) -> bool:
    return len(ev["body"]) > 10


def _topology() -> Topology:
    return Topology(
        name="shop",
        sources=["reviews", "clicks"],
        schema=EventSchema(
            fields={
                "body": "str",
                "stars": "float",
                "dwell": "float",
                "page": "str",
                "bought": "bool",
                "positive": "bool",
                "helpful": "bool",
            },
        ),
        features=[
            FeatureSpec(name="text", kind="text", inputs=["body"], dim=32, sources=["reviews"]),
            FeatureSpec(name="stars", inputs=["stars"], sources=["reviews"]),
            FeatureSpec(name="dwell", inputs=["dwell"], sources=["clicks"]),
            FeatureSpec(name="page", kind="hash", inputs=["page"], dim=8, sources=["clicks"]),
        ],
        tasks=[
            TaskSpec(
                name="positive",
                kind="binary",
                label="positive",
                source="reviews",
                augment=[
                    TokenDropout(feature="text", p=0.5),
                    SynonymSwap(feature="text", table={"good": ["great"]}, p=1.0),
                ],
            ),
            TaskSpec(
                name="helpful", kind="binary", label="helpful", source="reviews", where=is_long, features=["text"]
            ),
            TaskSpec(name="bought", kind="binary", label="bought", source="clicks"),
        ],
    )


class _Rec:
    def __init__(self, topic: str, offset: int, ev: object):
        self.topic, self.partition, self.offset, self.key = topic, 0, offset, None
        self.value = orjson.dumps(ev)


REVIEWS = [
    {"id": "r1", "body": "good food", "stars": 5.0, "positive": True, "helpful": False},
    {"id": "r2", "body": "a good long review text", "stars": 1.0, "positive": False, "helpful": True},
    {"id": "r3", "body": "meh", "stars": 3.0},  # no labels: trains nothing
]
CLICKS = [{"id": "c1", "dwell": 3.5, "page": "/home", "bought": True}, {"id": "c2", "dwell": 0.5, "page": "/x"}]


def _run() -> tuple[Topology, dict]:
    topo = _topology()
    stage = IngestStage(topo, {"shop.reviews": "reviews", "shop.clicks": "clicks"})
    out = stage.process(
        {
            "r": [_Rec("shop.reviews", i, e) for i, e in enumerate(REVIEWS)],
            "c": [_Rec("shop.clicks", i, e) for i, e in enumerate(CLICKS)] + [_Rec("shop.clicks", 9, {"id": "c3"})],
        }
    )
    return topo, out


def test_tasks_see_only_their_source_predicate_and_labelled_events() -> None:
    _, out = _run()
    got = {b.task: b.ids for b in out.batches}
    assert got == {"positive": ["r1", "r2"], "helpful": ["r2"], "bought": ["c1"]}
    # a click needs the click inputs, not the review ones: 'c3' lacks dwell and goes to the DLQ with a reason
    assert [d.reason for d in out.dead] == ["field 'dwell': missing"]


def test_features_of_another_source_and_masked_features_read_as_zero() -> None:
    topo, out = _run()
    sl = topo.feature_slices()
    b = {b.task: b for b in out.batches}
    assert not b["bought"].x[:, sl["text"]].any() and b["bought"].x[:, sl["dwell"]].any()
    assert b["positive"].x[:, sl["stars"]].any()
    assert not b["helpful"].x[:, sl["stars"]].any()  # helpful declared features=["text"] only
    assert b["helpful"].x[:, sl["text"]].any()


def test_text_augmentation_changes_training_copies_only() -> None:
    topo, out = _run()
    pos = next(b for b in out.batches if b.task == "positive")
    assert pos.x_train is not None and not np.array_equal(pos.x_train, pos.x)
    other = [b for b in out.batches if b.task != "positive"]
    assert all(b.x_train is None for b in other)
    # predictions come from x: identical to a trainer that was never given the augmented copy
    a, plain = Trainer(topo, device="cpu"), Trainer(topo, device="cpu")
    pos_plain = type(pos)(pos.task, pos.ids, pos.x, pos.y)
    assert a.observe(pos).scores == plain.observe(pos_plain).scores
    learned, _ = a.buffers["positive"].pop(2)
    np.testing.assert_array_equal(learned, pos.x_train)  # what is learned is the augmented copy


def _picky(ev: dict) -> bool:
    if ev["x"] < 0:
        raise ValueError("negative x")
    return True


def test_a_raising_where_predicate_dead_letters_the_event_and_the_stream_goes_on() -> None:
    topo = Topology(
        name="w",
        schema=EventSchema(fields={"x": "float", "a": "bool", "b": "bool"}),
        features=[FeatureSpec(name="n", inputs=["x"])],
        tasks=[
            TaskSpec(name="a", kind="binary", label="a", where=_picky),
            TaskSpec(name="b", kind="binary", label="b"),
        ],
    )

    class Rec:
        def __init__(self, offset: int, ev: dict):
            self.topic, self.partition, self.offset, self.key = "w.events", 0, offset, str(ev["id"]).encode()
            self.value = orjson.dumps(ev)

    recs = [Rec(i, {"id": f"e{i}", "x": float(x), "a": True, "b": False}) for i, x in enumerate([1, -2, 3, -4, 5])]
    out = IngestStage(topo).process({0: recs})
    by_task = {b.task: b.ids for b in out.batches}
    assert by_task == {"a": ["e0", "e2", "e4"], "b": ["e0", "e1", "e2", "e3", "e4"]}  # b keeps every event
    assert [(d.stage, d.error_class, d.offset, d.value) for d in out.dead] == [
        ("route", "ValueError", 1, recs[1].value),
        ("route", "ValueError", 3, recs[3].value),
    ]
    assert out.dead[0].reason == "tasks.a.where raised ValueError: negative x"
