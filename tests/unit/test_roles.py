"""Worker roles: which tasks a worker trains, in which consumer group, and how a poll's rounds are counted."""

from __future__ import annotations

import numpy as np
import pytest

from stream_mtl.app import Pipeline
from stream_mtl.codec import TaskBatch, decode_batch
from stream_mtl.pipeline import IngestOutput, task_frames
from stream_mtl.settings import Settings
from stream_mtl.topics import TopicNames
from stream_mtl.topology import EventSchema, FeatureSpec, TaskSpec, Topology, TopologyError


def _topology() -> Topology:
    return Topology(
        name="roles",
        schema=EventSchema(fields={"x": "float", "a": "bool", "b": "bool", "heavy": "float"}),
        features=[FeatureSpec(name="n", inputs=["x"])],
        tasks=[
            TaskSpec(name="a", kind="binary", label="a"),
            TaskSpec(name="b", kind="binary", label="b", depends_on=["a"]),
            TaskSpec(name="heavy", kind="regression", label="heavy", own_trainer=True),
        ],
    )


def _pipeline(role: str, tmp_path) -> Pipeline:
    return Pipeline(_topology(), Settings(role=role, trainer_process=False, data_dir=tmp_path, report_every_s=0))


@pytest.mark.parametrize(
    ("role", "tasks", "group", "ingest"),
    [
        ("all", ["a", "b"], "roles", True),
        ("trainer", ["a", "b"], "roles", False),
        ("task:heavy", ["heavy"], "roles-task-heavy", False),
    ],
)
def test_a_role_trains_its_tasks_in_its_own_group(role, tasks, group, ingest, tmp_path) -> None:
    p = _pipeline(role, tmp_path)
    try:
        assert p.train_tasks == tasks and [t.name for t in p.train_topology.tasks] == tasks
        assert p.app.conf.id == group and p.runs_ingest is ingest and p.trainer is not None
        # the model holds exactly those heads
        assert p.trainer.call_sync("snapshot")["tasks"].keys() == set(tasks)
    finally:
        p.close()


def test_an_ingest_worker_has_no_model(tmp_path) -> None:
    p = _pipeline("ingest", tmp_path)
    assert p.trainer is None and p.runs_ingest and p.app.conf.id == "roles-ingest"


def test_a_task_role_must_name_an_own_trainer_task(tmp_path) -> None:
    msg = r"'a' is not an own_trainer task of topology 'roles' \(own_trainer tasks: heavy\)"
    with pytest.raises(ValueError, match=msg):
        _pipeline("task:a", tmp_path)
    with pytest.raises(ValueError, match="role"):
        Settings(role="tasks:a")


def test_own_trainer_tasks_have_no_dependencies_across_models() -> None:
    topo = _topology()
    msg = r"tasks\[2\].depends_on\[0\]: 'heavy' and 'a' would be in different models"
    with pytest.raises(TopologyError, match=msg):
        Topology(**{**topo.model_dump(exclude={"tasks"}), "tasks": [
            *topo.tasks[:2], topo.tasks[2].model_copy(update={"depends_on": ["a"]})
        ]})  # fmt: skip


def test_a_round_counts_the_frames_of_one_trainer_group() -> None:
    """The shared model's trainer waits for a and b of a poll; heavy's trainer for heavy alone."""
    topo = _topology()
    x = np.zeros((1, 1), np.float32)
    out = IngestOutput(batches=[TaskBatch(t, ["e"], x, [1.0]) for t in ("a", "b", "heavy")])
    group_of = {t: g for g, ts in topo.trainer_groups().items() for t in ts}
    sizes = {task: decode_batch(f).round_size for task, _, f in task_frames(out, "w:1", 1, group_of)}
    assert sizes == {"a": 2, "b": 2, "heavy": 1}
    names = TopicNames(topo)
    assert {"roles-task-heavy-pending-changelog", "roles-ingest-outbox-changelog"} <= names.all().keys()
