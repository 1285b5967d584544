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
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, model_validator

__all__ = [
    "Augment",
    "BalancerSpec",
    "DriftSpec",
    "EventSchema",
    "FeatureSpec",
    "GaussianNoise",
    "Mixup",
    "ModelSpec",
    "Oversample",
    "SamplerSpec",
    "SynonymSwap",
    "TaskSpec",
    "TokenDropout",
    "Topology",
    "TopologyError",
    "load_topology",
    "load_topology_module",
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
    """The fields of one event: name → type; ``id_field`` identifies the event.

    ``time_field`` (optional, seconds since the epoch) is the event time that entity windows
    use; without it they use the time the event was ingested.
    """

    id_field: str = "id"
    time_field: str | None = None
    fields: dict[str, FieldType]


FeatureKind = Literal["standardize", "hash", "text", "entity"]
#: Default output width of the hashing features.
DEFAULT_DIM = {"hash": 32, "text": 256}


class FeatureSpec(_Frozen):
    """A shared feature, computed once per event and reused by every task that uses it.

    Kinds (see :mod:`stream_mtl.features`): ``standardize`` (running mean/variance of numeric
    inputs), ``hash`` (categorical fields hashed into ``dim`` buckets), ``text`` (a hashing
    vectoriser over one text field), ``entity`` (per-``key`` decayed count and mean of numeric
    inputs over ``window_s``, state evicted after ``ttl_s`` idle or beyond ``max_entities``).
    ``sources`` names the sources whose events carry the inputs (default: every source).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    kind: FeatureKind = "standardize"
    inputs: list[str] = Field(default_factory=list)
    sources: list[str] | None = None
    dim: int | None = Field(default=None, ge=1, le=1 << 16)
    key: str | None = None
    window_s: float = Field(default=3600.0, gt=0)
    ttl_s: float = Field(default=86_400.0, gt=0)
    max_entities: int = Field(default=100_000, ge=1)

    @property
    def width(self) -> int:
        """Number of model-input columns this feature produces."""
        if self.kind == "standardize":
            return len(self.inputs)
        if self.kind == "entity":
            return 1 + len(self.inputs)  # log-count, then one mean per input
        return int(self.dim or DEFAULT_DIM[self.kind])


class GaussianNoise(_Frozen):
    """Add ``N(0, std²)`` to a training copy of the task's inputs."""

    kind: Literal["noise"] = "noise"
    std: float = Field(default=0.1, gt=0)


class Mixup(_Frozen):
    """Mix pairs of training examples (inputs and labels) with ``λ ~ Beta(alpha, alpha)``."""

    kind: Literal["mixup"] = "mixup"
    alpha: float = Field(default=0.2, gt=0)


class TokenDropout(_Frozen):
    """Drop each token of a text feature with probability ``p`` in the training copy."""

    kind: Literal["token_dropout"] = "token_dropout"
    feature: str
    p: float = Field(default=0.1, gt=0, lt=1)


class SynonymSwap(_Frozen):
    """Replace tokens of a text feature by a synonym from ``table`` with probability ``p``."""

    kind: Literal["synonyms"] = "synonyms"
    feature: str
    table: dict[str, list[str]]
    p: float = Field(default=0.2, gt=0, le=1)


class Oversample(_Frozen):
    """SMOTE-style synthetic examples for a sparse task, up to ``share`` of each mini-batch.

    A synthetic example interpolates between a recent example and one of its ``k`` nearest
    recent neighbours with the same label.
    """

    kind: Literal["smote"] = "smote"
    share: float = Field(default=0.25, gt=0, lt=1)
    k: int = Field(default=5, ge=1)
    pool: int = Field(default=512, ge=2, description="recent examples kept per task to interpolate between")


Augment = Annotated[GaussianNoise | Mixup | TokenDropout | SynonymSwap | Oversample, Field(discriminator="kind")]


class DriftSpec(_Frozen):
    """How a task's prequential error stream is watched and what a drift on it does.

    ``detectors``: river detectors on the per-event error (binary/multiclass: 0/1 mistakes;
    regression: absolute error; ``ddm`` only on 0/1 errors). ``actions`` run when one fires, at
    most once per ``cooldown_s`` per task: ``boost_sampling`` (the task's sampling weight
    ×``boost``, decaying back over ``boost_steps`` batches), ``raise_lr`` (the learning rate of the
    shared trunk and of its head ×``lr_factor`` for ``boost_steps`` steps), ``reset_head``
    (re-initialise its head), ``rollback``
    (reload the newest checkpoint). Every alert and every action goes to ``<app>.alerts``.
    """

    detectors: list[Literal["adwin", "page_hinkley", "ddm"]] = Field(default_factory=lambda: ["adwin"])
    actions: list[Literal["boost_sampling", "raise_lr", "reset_head", "rollback"]] = Field(default_factory=list)
    cooldown_s: float = Field(default=60.0, ge=0)
    boost: float = Field(default=3.0, ge=1.0)
    lr_factor: float = Field(default=3.0, ge=1.0)
    boost_steps: int = Field(default=200, ge=1)
    adwin_delta: float = Field(default=0.002, gt=0, lt=1)


class TaskSpec(_Frozen):
    """One learning task: what to predict, from which events and label, with which loss.

    Segmentation: ``source`` (only events of that source), ``where`` (a predicate on the
    decoded event), and the label itself (an event without it trains nothing for this task).
    ``features`` limits the shared features the task sees (the others read as zeros).
    ``label_ttl_s`` turns on late labels: an event without the label is predicted and kept
    pending until its label arrives on ``<app>.labels`` or the TTL passes.
    ``augment`` transforms training copies only; predictions always see the real event.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    kind: TaskKind
    label: str
    #: a named loss (``LOSSES``) or a callable ``loss(logits, y) -> scalar tensor``: ``logits`` is
    #: ``[n, output_dim]``, ``y`` the float32 targets ``[n, k]`` (multiclass: the class index in column 0);
    #: a callable enters the topology hash by its qualified name
    loss: str | Callable[..., Any] | None = None
    weight: float = Field(default=1.0, ge=0.0)
    depends_on: list[str] = Field(default_factory=list)
    n_classes: int | None = Field(default=None, ge=2)
    source: str | None = None
    where: Callable[[dict[str, Any]], bool] | None = Field(default=None, exclude=True)
    features: list[str] | None = None
    label_ttl_s: float | None = Field(default=None, gt=0)
    augment: list[Augment] = Field(default_factory=list)
    lr_scale: float = Field(default=1.0, gt=0, description="multiplies the model lr for this task's head")
    drift: DriftSpec = Field(default_factory=DriftSpec)
    #: trained by workers of its own (``--role task:NAME``), in a model of its own (trunk + this head): a heavy or
    #: slow task then neither slows the shared model's steps nor waits for them; no dependencies across models
    own_trainer: bool = False

    @field_serializer("loss")
    def _loss_name(self, v: str | Callable[..., Any] | None) -> str | None:
        return _callable_name(v) if callable(v) else v

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

    def augment_of(self, kind: str) -> list[Any]:
        """This task's augmentations of one kind."""
        return [a for a in self.augment if a.kind == kind]


class BalancerSpec(_Frozen):
    """How per-task losses become one update (see :mod:`stream_mtl.balancing`)."""

    kind: Literal["static", "uncertainty", "dwa", "gradnorm", "pcgrad"] = "static"
    window: int = Field(default=20, ge=1, description="dwa: steps per loss window")
    temperature: float = Field(default=2.0, gt=0, description="dwa: softmax temperature")
    alpha: float = Field(default=1.5, ge=0, description="gradnorm: restoring-force strength")
    lr: float = Field(default=0.025, gt=0, description="gradnorm: learning rate of the task weights")


class ModelSpec(_Frozen):
    """The torch model: shared trunk layer sizes, the optimiser and the loss balancer."""

    trunk: list[int] = Field(default_factory=lambda: [256, 256])
    lr: float = Field(default=1e-3, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    detach_dependencies: bool = True
    balancer: BalancerSpec = Field(default_factory=BalancerSpec)


class SamplerSpec(_Frozen):
    """How a mixed mini-batch is split across tasks (see :mod:`stream_mtl.batching`).

    ``annealed`` moves the temperature from ``temperature`` to ``final_temperature`` over
    ``anneal_steps`` steps; ``adaptive`` raises (×``boost``, decaying over ``boost_steps``) the
    weight of a task whose recent loss rises or which a drift alert names.
    """

    kind: Literal["proportional", "uniform", "temperature", "annealed", "adaptive"] = "proportional"
    temperature: float = Field(default=1.0, gt=0)
    final_temperature: float = Field(default=1.0, gt=0)
    anneal_steps: int = Field(default=10_000, ge=1)
    boost: float = Field(default=2.0, ge=1.0)
    boost_steps: int = Field(default=200, ge=1)
    replay_share: float = Field(default=0.0, ge=0.0, lt=1.0, description="share of each task's rows replayed")
    replay_size: int = Field(default=2_000, ge=1, description="reservoir of past examples kept per task")


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
    sources: list[str] = Field(default_factory=lambda: ["events"], description="source topics: <app>.<source>")
    max_pending: int = Field(default=100_000, ge=1, description="bound of examples waiting for a late label")
    drift_features: list[str] = Field(
        default_factory=list, description="shared-feature columns whose value stream ADWIN watches (feature_columns())"
    )

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
    def input_dim(self) -> int:
        """Width of the shared feature vector (every feature's columns, concatenated)."""
        return sum(f.width for f in self.features)

    def feature_columns(self) -> list[str]:
        """A name per column of the shared feature vector (a standardised input keeps its field name)."""
        names: list[str] = []
        for f in self.features:
            if f.kind == "standardize":
                names += list(f.inputs)
            else:
                names += [f"{f.name}[{i}]" for i in range(f.width)]
        return names

    def feature_slices(self) -> dict[str, slice]:
        """Feature name → its columns in the shared feature vector."""
        out, start = {}, 0
        for f in self.features:
            out[f.name] = slice(start, start + f.width)
            start += f.width
        return out

    def features_of(self, source: str) -> list[FeatureSpec]:
        """The features computed for events of one source."""
        return [f for f in self.features if f.sources is None or source in f.sources]

    def tasks_of(self, source: str) -> list[TaskSpec]:
        """The tasks that events of one source can train."""
        return [t for t in self.tasks if t.source is None or t.source == source]

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def trainer_groups(self) -> dict[str, list[str]]:
        """Which model trains which tasks: ``""`` (the shared model) and one group per ``own_trainer`` task.

        >>> from stream_mtl.topology import EventSchema, FeatureSpec, TaskSpec, Topology
        >>> topo = Topology(name="g", schema=EventSchema(fields={"x": "float", "a": "bool", "b": "bool"}),
        ...                 features=[FeatureSpec(name="n", inputs=["x"])],
        ...                 tasks=[TaskSpec(name="a", kind="binary", label="a"),
        ...                        TaskSpec(name="b", kind="binary", label="b", own_trainer=True)])
        >>> topo.trainer_groups()
        {'': ['a'], 'b': ['b']}
        """
        groups: dict[str, list[str]] = {}
        for task in self.tasks:
            groups.setdefault(task.name if task.own_trainer else "", []).append(task.name)
        return groups

    def restricted_to(self, tasks: list[str]) -> Topology:
        """The same topology training only ``tasks`` (what one trainer group's model holds)."""
        keep = set(tasks)
        return self.model_copy(update={"tasks": [t for t in self.tasks if t.name in keep]})

    def task_order(self) -> list[str]:
        """Task names ordered so that every task comes after the tasks it depends on."""
        return _topological_order(self.tasks)

    def spec_hash(self) -> str:
        """A stable hash of the whole declaration (checkpoints and versions carry it).

        A task's ``where`` predicate enters by its qualified name.
        """
        doc = self.model_dump(mode="json", by_alias=True)
        doc["where"] = {t.name: _callable_name(t.where) for t in self.tasks if t.where is not None}
        payload = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(payload).hexdigest()[:16]

    def feature_version(self) -> str:
        """A hash of the feature definitions; envelopes carry it."""
        payload = orjson.dumps([f.model_dump(mode="json") for f in self.features], option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(payload).hexdigest()[:12]


def _takes_two_args(fn: Callable[..., Any]) -> bool:
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): let it be tried
        return True
    return True


def _callable_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


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


_NUMERIC_TYPES = ("float", "int", "bool")


def _validate(t: Topology) -> None:
    fields = t.schema.fields
    names = ", ".join(fields)
    if t.schema.id_field in fields:
        raise TopologyError(f"schema.id_field: {t.schema.id_field!r} must not also be a data field")
    tf = t.schema.time_field
    if tf is not None and (tf not in fields or fields[tf] not in ("float", "int")):
        raise TopologyError(f"schema.time_field: {tf!r} must be a numeric field of the event schema")
    if not t.sources or len(set(t.sources)) != len(t.sources):
        raise TopologyError("sources: at least one source, each named once")
    for i, src in enumerate(t.sources):
        if not src.replace("_", "").replace("-", "").isalnum():
            raise TopologyError(f"sources[{i}]: {src!r} must be letters, digits, '_' or '-'")
    _validate_features(t, fields)
    if not t.tasks:
        raise TopologyError("tasks: a topology needs at least one task")
    seen: dict[str, int] = {}
    feature_names = {f.name: f for f in t.features}
    columns = set(t.feature_columns())
    for j, col in enumerate(t.drift_features):
        if col not in columns:
            raise TopologyError(
                f"drift_features[{j}]: {col!r} is not a feature column (see Topology.feature_columns())"
            )
    for i, task in enumerate(t.tasks):
        if task.name in seen:
            raise TopologyError(f"tasks[{i}].name: duplicate task {task.name!r} (also tasks[{seen[task.name]}])")
        seen[task.name] = i
        if task.label not in fields:
            raise TopologyError(
                f"tasks[{i}].label: {task.label!r} is not a field of the event schema (fields: {names})"
            )
        if callable(task.loss):
            if not _takes_two_args(task.loss):
                raise TopologyError(
                    f"tasks[{i}].loss: a loss callable must take (logits, y); {_callable_name(task.loss)} does not"
                )
        elif task.loss not in LOSSES:
            raise TopologyError(f"tasks[{i}].loss: unknown loss {task.loss!r} (known: {', '.join(LOSSES)})")
        elif task.kind not in LOSSES[task.loss]:
            raise TopologyError(f"tasks[{i}].loss: {task.loss!r} does not fit a {task.kind} task")
        if "ddm" in task.drift.detectors and task.kind == "regression":
            raise TopologyError(f"tasks[{i}].drift.detectors: ddm needs 0/1 errors; {task.name!r} is a regression task")
        if task.kind == "multiclass" and task.n_classes is None:
            raise TopologyError(f"tasks[{i}].n_classes: a multiclass task must declare n_classes")
        if task.source is not None and task.source not in t.sources:
            raise TopologyError(f"tasks[{i}].source: unknown source {task.source!r} (sources: {', '.join(t.sources)})")
        usable = t.features_of(task.source) if task.source is not None else t.features
        for j, fname in enumerate(task.features or []):
            if fname not in feature_names:
                raise TopologyError(f"tasks[{i}].features[{j}]: unknown feature {fname!r}")
            if feature_names[fname] not in usable:
                raise TopologyError(f"tasks[{i}].features[{j}]: feature {fname!r} is not computed for {task.source!r}")
        for j, aug in enumerate(task.augment):
            where = f"tasks[{i}].augment[{j}]"
            if aug.kind in ("token_dropout", "synonyms"):
                feat = feature_names.get(aug.feature)
                if feat is None or feat.kind != "text":
                    raise TopologyError(f"{where}.feature: {aug.feature!r} is not a text feature")
            if aug.kind == "mixup" and task.kind == "multiclass":
                raise TopologyError(f"{where}: mixup needs soft labels; task {task.name!r} is multiclass")
    for i, task in enumerate(t.tasks):
        for j, dep in enumerate(task.depends_on):
            if dep not in seen:
                raise TopologyError(f"tasks[{i}].depends_on[{j}]: unknown task {dep!r}")
            if dep == task.name:
                raise TopologyError(f"tasks[{i}].depends_on[{j}]: task {dep!r} depends on itself")
            if task.own_trainer or t.task(dep).own_trainer:
                raise TopologyError(
                    f"tasks[{i}].depends_on[{j}]: {task.name!r} and {dep!r} would be in different models "
                    "(an own_trainer task trains alone: it has no dependencies and nothing depends on it)"
                )
    _topological_order(t.tasks)
    if not t.features:
        raise TopologyError("features: a topology needs at least one feature")


def _validate_features(t: Topology, fields: dict[str, str]) -> None:
    seen: set[str] = set()
    for i, feat in enumerate(t.features):
        if feat.name in seen:
            raise TopologyError(f"features[{i}].name: duplicate feature {feat.name!r}")
        seen.add(feat.name)
        for j, src in enumerate(feat.sources or []):
            if src not in t.sources:
                raise TopologyError(f"features[{i}].sources[{j}]: unknown source {src!r}")
        want_numeric = feat.kind in ("standardize", "entity")
        if feat.kind != "entity" and not feat.inputs:
            raise TopologyError(f"features[{i}].inputs: a {feat.kind} feature needs at least one input")
        if feat.kind == "text" and len(feat.inputs) != 1:
            raise TopologyError(f"features[{i}].inputs: a text feature reads exactly one field")
        for j, field in enumerate(feat.inputs):
            if field not in fields:
                raise TopologyError(f"features[{i}].inputs[{j}]: {field!r} is not a field of the event schema")
            if want_numeric and fields[field] not in _NUMERIC_TYPES:
                raise TopologyError(f"features[{i}].inputs[{j}]: {field!r} is {fields[field]}, not numeric")
            if feat.kind == "text" and fields[field] != "str":
                raise TopologyError(f"features[{i}].inputs[{j}]: {field!r} is {fields[field]}, not str")
        if feat.kind == "entity":
            if feat.key is None:
                raise TopologyError(f"features[{i}].key: an entity feature needs the entity key field")
            if feat.key not in fields:
                raise TopologyError(f"features[{i}].key: {feat.key!r} is not a field of the event schema")
        elif feat.key is not None:
            raise TopologyError(f"features[{i}].key: only entity features have a key")
        if feat.dim is not None and feat.kind not in ("hash", "text"):
            raise TopologyError(f"features[{i}].dim: only hash and text features have a dim")


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


def load_topology_module(near: str | Path) -> Any:
    """The module of the ``topology.py`` in the folder of ``near`` (a producer reads what its topology declares)."""
    return _load_module(Path(near).resolve().with_name("topology.py"), "topology")


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
