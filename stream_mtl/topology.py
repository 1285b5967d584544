"""The declarative description of one pipeline, validated when it is loaded.

A topology is a value: an event schema, the shared features, the tasks, the model, the
sampler and batch sizes. It is pure data (no import side effects); :func:`load_topology`
reads one from a Python file and every mistake fails there with a message naming the field.

>>> t = Topology(
...     name="toy",
...     schema=EventSchema(fields={"x1": "float", "x2": "float", "y": "bool"}),
...     features=[FeatureSpec(name="num", kind="standardize", inputs=["x1", "x2"])],
...     tasks=[TaskSpec(name="t", kind="binary", label="y")],
... )
>>> t.tasks[0].loss, t.input_dim, t.task_order()
('bce', 2, ['t'])
>>> try:
...     Topology(name="bad", schema=EventSchema(fields={"x": "float"}), features=[],
...              tasks=[TaskSpec(name="t", kind="binary", label="nope")])
... except TopologyError as e:
...     print(e)
tasks[0].label: 'nope' is not a field of the event schema (fields: x)
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "EventSchema",
    "FeatureSpec",
    "ModelSpec",
    "SamplerSpec",
    "TaskSpec",
    "Topology",
    "TopologyError",
    "load_topology",
    "resolve_topology_path",
]

FieldType = Literal["float", "int", "bool", "str"]
TaskKind = Literal["binary", "multiclass", "multilabel", "regression"]

#: Losses a task may name, and the task kinds each one fits.
LOSSES: dict[str, tuple[str, ...]] = {
    "bce": ("binary", "multilabel"),
    "ce": ("multiclass",),
    "mse": ("regression",),
    "huber": ("regression",),
    "l1": ("regression",),
}
DEFAULT_LOSS: dict[str, str] = {"binary": "bce", "multilabel": "bce", "multiclass": "ce", "regression": "mse"}


class TopologyError(ValueError):
    """A topology is invalid; the message starts with the path of the offending field."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EventSchema(_Frozen):
    """The fields of one event: name → type; ``id_field`` identifies the event."""

    id_field: str = "id"
    fields: dict[str, FieldType]


class FeatureSpec(_Frozen):
    """A shared feature, computed once per event and reused by every task."""

    name: str
    kind: Literal["standardize"] = "standardize"
    inputs: list[str]


class TaskSpec(_Frozen):
    """One learning task: what to predict, from which label field, with which loss."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    kind: TaskKind
    label: str
    loss: str | None = None
    weight: float = Field(default=1.0, ge=0.0)
    depends_on: list[str] = Field(default_factory=list)
    n_classes: int | None = Field(default=None, ge=2)

    @model_validator(mode="after")
    def _default_loss(self) -> TaskSpec:
        if self.loss is None:
            object.__setattr__(self, "loss", DEFAULT_LOSS[self.kind])
        return self

    @property
    def output_dim(self) -> int:
        """Width of this task's head output."""
        if self.kind == "multiclass":
            return int(self.n_classes or 2)
        if self.kind == "multilabel":
            return int(self.n_classes or 1)
        return 1


class ModelSpec(_Frozen):
    """The torch model: shared trunk layer sizes and the optimiser."""

    trunk: list[int] = Field(default_factory=lambda: [256, 256])
    lr: float = Field(default=1e-3, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    detach_dependencies: bool = True


class SamplerSpec(_Frozen):
    """How a mixed mini-batch is split across tasks (see :mod:`stream_mtl.batching`)."""

    kind: Literal["proportional", "uniform", "temperature"] = "proportional"
    temperature: float = Field(default=1.0, gt=0)


class Topology(_Frozen):
    """One pipeline, declared as a value."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    schema_: EventSchema = Field(alias="schema")
    features: list[FeatureSpec]
    tasks: list[TaskSpec]
    model: ModelSpec = Field(default_factory=ModelSpec)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    batch_size: int = Field(default=16, ge=1, description="examples per train step")
    ingest_batch: int = Field(default=1000, ge=1, description="max source records read per poll")
    buffer_size: int = Field(default=10_000, ge=1, description="bound of each per-task buffer")
    partitions: int = Field(default=1, ge=1, description="partitions of the source and task topics")
    source: str | None = Field(default=None, description="source topic; default <name>.events")

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def __init__(self, **data: object) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise TopologyError(_format_validation_error(exc)) from None

    @model_validator(mode="after")
    def _check(self) -> Topology:
        _validate(self)
        return self

    @property
    def schema(self) -> EventSchema:  # type: ignore[override]
        return self.schema_

    @property
    def feature_inputs(self) -> list[str]:
        """Numeric input fields in model-input order (features concatenated)."""
        return [f for spec in self.features for f in spec.inputs]

    @property
    def input_dim(self) -> int:
        return len(self.feature_inputs)

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def task_order(self) -> list[str]:
        """Task names ordered so that every task comes after the tasks it depends on."""
        return _topological_order(self.tasks)

    def spec_hash(self) -> str:
        """A stable hash of the whole declaration (checkpoints and versions carry it)."""
        payload = orjson.dumps(self.model_dump(mode="json", by_alias=True), option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(payload).hexdigest()[:16]

    def feature_version(self) -> str:
        """A hash of the feature definitions; envelopes carry it."""
        payload = orjson.dumps([f.model_dump(mode="json") for f in self.features], option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(payload).hexdigest()[:12]


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        loc = loc.replace("schema_", "schema")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def _validate(t: Topology) -> None:
    fields = t.schema.fields
    names = ", ".join(fields)
    if t.schema.id_field in fields:
        raise TopologyError(f"schema.id_field: {t.schema.id_field!r} must not also be a data field")
    for i, feat in enumerate(t.features):
        for j, field in enumerate(feat.inputs):
            if field not in fields:
                raise TopologyError(f"features[{i}].inputs[{j}]: {field!r} is not a field of the event schema")
            if fields[field] not in ("float", "int", "bool"):
                raise TopologyError(f"features[{i}].inputs[{j}]: {field!r} is {fields[field]}, not numeric")
    if not t.tasks:
        raise TopologyError("tasks: a topology needs at least one task")
    seen: dict[str, int] = {}
    for i, task in enumerate(t.tasks):
        if task.name in seen:
            raise TopologyError(f"tasks[{i}].name: duplicate task {task.name!r} (also tasks[{seen[task.name]}])")
        seen[task.name] = i
        if task.label not in fields:
            raise TopologyError(
                f"tasks[{i}].label: {task.label!r} is not a field of the event schema (fields: {names})"
            )
        if task.loss not in LOSSES:
            raise TopologyError(f"tasks[{i}].loss: unknown loss {task.loss!r} (known: {', '.join(LOSSES)})")
        if task.kind not in LOSSES[task.loss]:
            raise TopologyError(f"tasks[{i}].loss: {task.loss!r} does not fit a {task.kind} task")
        if task.kind == "multiclass" and task.n_classes is None:
            raise TopologyError(f"tasks[{i}].n_classes: a multiclass task must declare n_classes")
    for i, task in enumerate(t.tasks):
        for j, dep in enumerate(task.depends_on):
            if dep not in seen:
                raise TopologyError(f"tasks[{i}].depends_on[{j}]: unknown task {dep!r}")
            if dep == task.name:
                raise TopologyError(f"tasks[{i}].depends_on[{j}]: task {dep!r} depends on itself")
    _topological_order(t.tasks)
    if not t.feature_inputs:
        raise TopologyError("features: a topology needs at least one numeric feature input")


def _topological_order(tasks: list[TaskSpec]) -> list[str]:
    deps = {t.name: list(t.depends_on) for t in tasks}
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = [*path[path.index(name) :], name]
            raise TopologyError(f"tasks.depends_on: dependency cycle {' -> '.join(cycle)}")
        state[name] = 1
        for dep in deps.get(name, []):
            visit(dep, [*path, name])
        state[name] = 2
        order.append(name)

    for t in tasks:
        visit(t.name, [])
    return order


def resolve_topology_path(ref: str | Path) -> Path:
    """Find a topology file from a name (``yeast``), a folder, or a ``.py`` path."""
    path = Path(ref)
    candidates = [path, path / "topology.py"]
    if not path.suffix and len(path.parts) == 1:
        for root in (Path.cwd() / "topologies", Path(__file__).resolve().parent.parent / "topologies"):
            candidates.append(root / str(ref) / "topology.py")
    for cand in candidates:
        if cand.is_file():
            return cand.resolve()
    raise TopologyError(f"topology {str(ref)!r}: no such file (looked at {', '.join(map(str, candidates))})")


def _load_module(path: Path, attr_hint: str) -> object:
    mod_name = f"_stream_mtl_{attr_hint}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:  # pragma: no cover
        raise TopologyError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[mod_name]
        raise
    return module


def load_topology(ref: str | Path) -> Topology:
    """Load and validate the ``topology`` value declared in a topology file."""
    path = resolve_topology_path(ref)
    module = _load_module(path, "topology")
    topo = getattr(module, "topology", None)
    if not isinstance(topo, Topology):
        raise TopologyError(f"{path}: must define `topology = Topology(...)`")
    return topo


def load_producer(ref: str | Path):
    """The ``events()`` function of the ``producer.py`` next to a topology file."""
    path = resolve_topology_path(ref).parent / "producer.py"
    if not path.is_file():
        raise TopologyError(f"{path}: the topology has no producer.py that replays its data set")
    module = _load_module(path, "producer")
    fn = getattr(module, "events", None)
    if not callable(fn):
        raise TopologyError(f"{path}: must define `def events() -> Iterator[dict]`")
    return fn
