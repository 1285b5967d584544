"""Topology validation: every mistake fails at load with a message naming the field."""

from pathlib import Path

import pytest

from stream_mtl import EventSchema, FeatureSpec, TaskSpec, Topology, TopologyError, load_topology


def make(tasks: list[TaskSpec], **kw: object) -> Topology:
    return Topology(
        name="t",
        schema=EventSchema(fields={"x": "float", "a": "bool", "b": "float", "c": "int"}),
        features=[FeatureSpec(name="n", inputs=["x"])],
        tasks=tasks,
        **kw,
    )


def test_valid_topology_has_defaults() -> None:
    t = make([TaskSpec(name="a", kind="binary", label="a"), TaskSpec(name="b", kind="regression", label="b")])
    assert [task.loss for task in t.tasks] == ["bce", "mse"]
    assert t.input_dim == 1
    assert t.spec_hash() == make(list(t.tasks)).spec_hash()


def test_unknown_label_field_names_the_field() -> None:
    with pytest.raises(TopologyError, match=r"tasks\[1\]\.label: 'zzz' is not a field"):
        make([TaskSpec(name="a", kind="binary", label="a"), TaskSpec(name="z", kind="binary", label="zzz")])


def test_duplicate_task() -> None:
    with pytest.raises(TopologyError, match=r"tasks\[1\]\.name: duplicate task 'a'"):
        make([TaskSpec(name="a", kind="binary", label="a"), TaskSpec(name="a", kind="regression", label="b")])


def test_unknown_loss() -> None:
    with pytest.raises(TopologyError, match=r"tasks\[0\]\.loss: unknown loss 'hinge'"):
        make([TaskSpec(name="a", kind="binary", label="a", loss="hinge")])


def test_loss_must_fit_kind() -> None:
    with pytest.raises(TopologyError, match=r"tasks\[0\]\.loss: 'mse' does not fit a binary task"):
        make([TaskSpec(name="a", kind="binary", label="a", loss="mse")])


def test_dependency_cycle_is_named() -> None:
    with pytest.raises(TopologyError, match=r"dependency cycle a -> b -> c -> a"):
        make(
            [
                TaskSpec(name="a", kind="binary", label="a", depends_on=["b"]),
                TaskSpec(name="b", kind="regression", label="b", depends_on=["c"]),
                TaskSpec(name="c", kind="regression", label="c", depends_on=["a"]),
            ]
        )


def test_unknown_dependency() -> None:
    with pytest.raises(TopologyError, match=r"tasks\[0\]\.depends_on\[0\]: unknown task 'nope'"):
        make([TaskSpec(name="a", kind="binary", label="a", depends_on=["nope"])])


def test_unknown_topology_field() -> None:
    with pytest.raises(TopologyError, match=r"batchsize: unknown field"):
        make([TaskSpec(name="a", kind="binary", label="a")], batchsize=3)


def test_bad_value_names_nested_field() -> None:
    with pytest.raises(TopologyError, match=r"tasks\[0\]\.kind"):
        Topology(
            name="t",
            schema={"fields": {"x": "float"}},
            features=[{"name": "n", "inputs": ["x"]}],
            tasks=[{"name": "a", "kind": "ranking", "label": "x"}],
        )


def test_feature_input_must_exist() -> None:
    with pytest.raises(TopologyError, match=r"features\[0\]\.inputs\[0\]: 'q' is not a field"):
        Topology(
            name="t",
            schema=EventSchema(fields={"x": "float", "a": "bool"}),
            features=[FeatureSpec(name="n", inputs=["q"])],
            tasks=[TaskSpec(name="a", kind="binary", label="a")],
        )


def test_load_yeast() -> None:
    t = load_topology("yeast")
    assert len(t.tasks) == 14 and t.input_dim == 103
    assert all(task.kind == "binary" for task in t.tasks)


def test_load_file_without_topology(tmp_path: Path) -> None:
    f = tmp_path / "topology.py"
    f.write_text("x = 1\n")
    with pytest.raises(TopologyError, match="must define `topology = Topology"):
        load_topology(f)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sources": ["a", "a"]}, r"sources: at least one source, each named once"),
        ({"tasks": [TaskSpec(name="t", kind="binary", label="y", source="nope")]}, r"tasks\[0\]\.source: unknown"),
        ({"tasks": [TaskSpec(name="t", kind="binary", label="y", features=["zz"])]},
         r"tasks\[0\]\.features\[0\]: unknown feature 'zz'"),
        ({"tasks": [TaskSpec(name="t", kind="binary", label="y",
                             augment=[{"kind": "token_dropout", "feature": "n"}])]},
         r"tasks\[0\]\.augment\[0\]\.feature: 'n' is not a text feature"),
        ({"tasks": [TaskSpec(name="t", kind="multiclass", label="y", n_classes=3, augment=[{"kind": "mixup"}])]},
         r"tasks\[0\]\.augment\[0\]: mixup needs soft labels"),
        ({"features": [FeatureSpec(name="e", kind="entity", inputs=["x"])]}, r"features\[0\]\.key: an entity feature"),
        ({"features": [FeatureSpec(name="t", kind="text", inputs=["x"])]}, r"features\[0\]\.inputs\[0\]: 'x' is float"),
        ({"features": [FeatureSpec(name="n", inputs=["x"], sources=["other"])]},
         r"features\[0\]\.sources\[0\]: unknown source 'other'"),
        ({"features": [FeatureSpec(name="n", inputs=["x"], dim=4)]}, r"features\[0\]\.dim: only hash and text"),
    ],
)  # fmt: skip
def test_data_layer_fields_are_validated_by_name(change: dict, message: str) -> None:
    base = {
        "name": "t",
        "schema": EventSchema(fields={"x": "float", "y": "int"}),
        "features": [FeatureSpec(name="n", inputs=["x"])],
        "tasks": [TaskSpec(name="t", kind="binary", label="y")],
    }
    with pytest.raises(TopologyError, match=message):
        Topology(**{**base, **change})


def test_unknown_augmentation_kind_names_the_field() -> None:
    with pytest.raises(TopologyError, match=r"tasks\[0\]\.augment\[0\]"):
        Topology(
            name="t",
            schema=EventSchema(fields={"x": "float", "y": "bool"}),
            features=[FeatureSpec(name="n", inputs=["x"])],
            tasks=[{"name": "t", "kind": "binary", "label": "y", "augment": [{"kind": "rotate"}]}],
        )


def test_predicate_enters_the_spec_hash_by_name() -> None:
    def long_text(ev: dict) -> bool:
        return True

    def short_text(ev: dict) -> bool:
        return False

    def topo(where: object) -> Topology:
        return Topology(name="t", schema=EventSchema(fields={"x": "float", "y": "bool"}),
                        features=[FeatureSpec(name="n", inputs=["x"])],
                        tasks=[TaskSpec(name="t", kind="binary", label="y", where=where)])  # fmt: skip

    assert topo(long_text).spec_hash() != topo(short_text).spec_hash() != topo(None).spec_hash()
