"""Late labels: parsing at ingest, joining in the trainer, expiry, bounds and restore."""

from __future__ import annotations

import numpy as np
import orjson

from stream_mtl.codec import TaskBatch
from stream_mtl.labels import PendingLabels, chunk_partition, parse_labels
from stream_mtl.topology import EventSchema, FeatureSpec, TaskSpec, Topology
from stream_mtl.trainer import Trainer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _topology() -> Topology:
    return Topology(
        name="late",
        schema=EventSchema(fields={"x": "float", "clicked": "bool", "bought": "bool", "spend": "float"}),
        features=[FeatureSpec(name="n", inputs=["x"])],
        tasks=[
            TaskSpec(name="clicked", kind="binary", label="clicked"),  # labels on the event only
            TaskSpec(name="bought", kind="binary", label="bought", label_ttl_s=60.0),
            TaskSpec(name="spend", kind="regression", label="spend", label_ttl_s=5.0),
        ],
        batch_size=4,
        max_pending=100,
    )


class _Rec:
    def __init__(self, offset: int, value: bytes | None):
        self.topic, self.partition, self.offset, self.key, self.value = "late.labels", 0, offset, b"k", value


def test_label_messages_become_frames_and_bad_ones_dead_letters() -> None:
    msgs = [
        {"id": "e1", "task": "bought", "value": True, "ts": 5.0, "meta": {"src": "crm"}},
        {"id": "e2", "task": "spend", "value": 12.5},
        {"id": "e3", "task": "clicked", "value": True},  # a task without late labels
        {"id": "e4", "task": "bought", "value": "yes"},  # wrong type
        {"task": "bought", "value": True},  # no id
    ]
    recs = [_Rec(i, orjson.dumps(m)) for i, m in enumerate(msgs)] + [_Rec(9, b"{oops")]
    frames, dead = parse_labels(recs, _topology(), clock=lambda: 7.0)
    by_task = {f.task: f for f in frames}
    assert by_task["bought"].ids == ["e1"] and by_task["bought"].y == [1.0] and by_task["bought"].ts == [5.0]
    assert by_task["bought"].meta == [{"src": "crm"}] and by_task["bought"].kind == "labels"
    assert by_task["spend"].ts == [7.0]  # no ts: the time it was read
    reasons = [d.reason for d in dead]
    assert len(dead) == 4 and all(d.stage == "labels" for d in dead)
    assert "does not take late labels" in reasons[0] and "field 'value'" in reasons[1]
    assert "field 'id'" in reasons[2] and "invalid JSON" in reasons[3]
    assert dead[0].value == recs[2].value  # original bytes kept


def test_join_expiry_duplicates_and_unknown_ids() -> None:
    clock = Clock()
    p = PendingLabels(max_rows=100, ttl={"bought": 60.0}, clock=clock)
    p.add("bought", ["a", "b", "c"], np.eye(3, dtype=np.float32), None, np.array([True, False, True]), {})
    hit = p.join("bought", ["a"], [1.0], [1001.0], [None])
    assert hit.ids == ["a"] and hit.decided == [True] and hit.x is not None and hit.x[0].tolist() == [1, 0, 0]
    assert hit.delays == [1.0]
    again = p.join("bought", ["a", "zz"], [1.0, 0.0], [1002.0, 1002.0], [None, None])
    assert [e.reason for e in again.expired] == ["duplicate"]
    assert p.early_rows == 1  # 'zz' may simply have overtaken its event: it waits, bounded by the TTL
    clock.now += 61  # past the TTL, not yet swept: the label is recognised as late
    late = p.join("bought", ["b"], [0.0], [clock.now], [{"src": "x"}])
    assert late.ids == [] and late.expired[0].reason == "expired" and late.expired[0].meta == {"src": "x"}
    swept = p.sweep()  # 'c' never got its label: dropped and counted, not filled in; 'zz' never met its event
    assert [(e.id, e.reason) for e in swept] == [("zz", "unknown_event")] and p.rows == 0 and p.early_rows == 0
    snap = p.snapshot()["bought"]
    assert (snap["joined"], snap["expired"], snap["duplicate"], snap["unknown_event"]) == (1, 1, 1, 1)
    assert snap["unlabelled_expired"] == 1 and snap["pending"] == 0


def test_a_label_that_overtakes_its_event_is_joined_when_the_event_comes() -> None:
    clock = Clock()
    tr = Trainer(_topology(), device="cpu", clock=clock)
    labels = TaskBatch("bought", ["a"], np.zeros((1, 0), np.float32), [1.0], ts=[clock.now], kind="labels", meta=[None])
    assert tr.observe_labels(labels) == []
    tr.observe(TaskBatch("bought", ["a", "b"], np.ones((2, 1), np.float32), [None, None]))
    assert tr.metrics["bought"].n == 1 and len(tr.buffers["bought"]) == 1  # 'a' labelled on arrival
    assert tr.pending_labels.rows == 1 and tr.pending_labels.early_rows == 0  # 'b' still waits
    assert tr.snapshot()["labels"]["bought"]["sources"] == {"unspecified": 1}  # counted like any joined label


def test_pending_rows_are_bounded() -> None:
    p = PendingLabels(max_rows=5, ttl={"t": 1e9}, clock=Clock())
    for i in range(4):
        p.add("t", [f"{i}-{j}" for j in range(2)], np.zeros((2, 1), np.float32), None, np.zeros(2), {})
    assert p.rows <= 5 and p.snapshot()["t"]["evicted"] == 4  # the two oldest chunks went


def test_pending_state_round_trips_through_table_writes() -> None:
    clock = Clock()
    a = PendingLabels(max_rows=100, ttl={"t": 60.0}, clock=clock)
    a.add("t", ["a", "b"], np.array([[1.0], [2.0]], np.float32), None, np.array([0.2, 0.9]), {"s:0": [3, 4]})
    a.join("t", ["a"], [0.0], [clock.now], [None])
    table: dict[str, bytes] = {}
    for k, v in a.changes().items():
        if v is None:
            table.pop(k, None)
        else:
            table[k] = v
    b = PendingLabels(max_rows=100, ttl={"t": 60.0}, clock=clock)
    assert b.restore(list(table.items())) == 1  # only 'b' is still waiting
    hit = b.join("t", ["b"], [1.0], [clock.now], [None])
    assert hit.ids == ["b"] and hit.x is not None and hit.x[0].tolist() == [2.0] and hit.decided == [0.9]


def test_pending_state_moves_with_its_task_partition() -> None:
    """A rebalance: the old owner forgets a partition's rows without deleting them from the changelog, and the
    new owner restores exactly that partition's rows (its keys lead with it, the changelog is keyed by it)."""
    clock = Clock()
    ttl = {"t": 60.0, "u": 60.0}
    old = PendingLabels(max_rows=100, ttl=ttl, clock=clock)
    one = np.zeros((1, 1), np.float32)
    for task, p, eid in [("t", 0, "a"), ("t", 1, "b"), ("u", 1, "c")]:
        old.add(task, [eid], one, None, np.array([0.5]), {}, partition=p)
    changelog: dict[int, dict[str, bytes]] = {}
    for k, v in old.changes().items():
        assert v is not None
        changelog.setdefault(chunk_partition(k), {})[k] = v
    assert sorted(changelog) == [0, 1] and len(changelog[1]) == 2
    # a replayed frame (read again after a restart) does not make its rows wait twice
    assert old.add("t", ["a", "new"], np.zeros((2, 1), np.float32), None, np.array([0.1, 0.2]), {}, partition=0)
    assert old.rows == 4 and old.snapshot()["t"]["replayed"] == 1
    assert old.add("t", ["a"], one, None, np.array([0.1]), {}, partition=0) == ""
    old.drop_partitions({("t", 0)})
    old.changes()

    assert old.drop_partitions({("t", 1)}) == 1  # revoked: t's partition 1 belongs to another worker now …
    assert old.changes() == {}  # … so nothing is deleted from the changelog
    assert old.rows == 1 and old.join("t", ["b"], [1.0], [clock.now], [None]).ids == []  # b now waits as early

    new = PendingLabels(max_rows=100, ttl=ttl, clock=clock)
    new.add("t", ["stale"], one, None, np.array([0.5]), {}, partition=1)  # held from an earlier assignment
    items = [(k, v) for k, v in changelog[1].items() if k.startswith("1:t:")]
    assert new.restore(items, {("t", 1)}) == 1  # replaced, not added to: 'stale' is gone, 'b' is back
    assert new.join("t", ["b", "stale"], [1.0, 0.0], [clock.now] * 2, [None] * 2).ids == ["b"]


def test_trainer_predicts_now_and_learns_when_the_label_comes() -> None:
    clock = Clock()
    topo = _topology()
    tr = Trainer(topo, device="cpu", clock=clock)
    x = np.ones((3, 1), np.float32)
    preds = tr.observe(TaskBatch("bought", ["a", "b", "c"], x, [None, True, None]))
    assert len(preds) == 3  # every event predicted, labelled or not
    assert len(tr.buffers["bought"]) == 1 and tr.pending_labels.rows == 2  # one learnable, two pending
    assert tr.metrics["bought"].n == 1
    expired = tr.observe_labels(
        TaskBatch(
            "bought",
            ["a", "a"],
            np.zeros((2, 0), np.float32),
            [1.0, 0.0],
            ts=[clock.now + 2, clock.now],
            kind="labels",
            meta=[None, None],
        )
    )
    assert [(e.id, e.reason) for e in expired] == [("a", "duplicate")]
    assert len(tr.buffers["bought"]) == 2 and tr.metrics["bought"].n == 2  # scored against the early prediction
    snap = tr.snapshot()["labels"]["bought"]
    assert snap["joined"] == 1 and snap["pending"] == 1 and snap["delay_mean_s"] == 2.0
    assert snap["sources"] == {"unspecified": 1}
