"""Test a pipeline without a broker: an in-process topology driver, per-task checks, a pytest helper.

:class:`TopologyDriver` is to a topology what Kafka Streams' ``TopologyTestDriver`` is to a
topology there: it plays Kafka and the Faust agents in-process and deterministically, and runs the
very code the agents run. A call to :meth:`~TopologyDriver.pipe` turns events into
:class:`Record`\\ s (topic, partition by key as Kafka's default partitioner does, offsets), cuts
them into polls of ``topology.ingest_batch`` records like the ingest consumer, and per poll calls
:meth:`IngestStage.process <stream_mtl.pipeline.IngestStage.process>` and
:func:`~stream_mtl.pipeline.task_frames` (what the ingest service sends), then hands the frames to
a :class:`~stream_mtl.trainer_host.TrainerSession` through a thread-mode
:class:`~stream_mtl.trainer_host.TrainerHost` (``process``, as the trainer agent does; ``train``
and ``sweep`` as its timer does when the stream is quiet or time passes) — one session per trainer
group, as the workers of ``--role trainer`` and ``--role task:NAME`` (``own_trainer`` tasks) hold
them. The clock is the driver's: :meth:`~TopologyDriver.advance_time` moves label TTLs, entity
windows and drift cool-downs.

>>> from stream_mtl.synthetic import SyntheticStream, synthetic_topology
>>> topo = synthetic_topology(SyntheticStream(n_features=3, n_binary=2, n_regression=0), batch_size=8)
>>> with TopologyDriver(topo, seed=1) as driver:
...     driver.pipe([{"id": "a", "f0": 0.1, "f1": 1.0, "f2": -1.0, "y0": True, "y1": False}, b"{not json"])
...     rows, dead = driver.predictions(), driver.dlq()
>>> sorted((r["id"], r["task"]) for r in rows), [(d.stage, d.value) for d in dead]
([('a', 'y0'), ('a', 'y1')], [('ingest', b'{not json')])

:func:`check_task` runs generic checks on one task (:data:`CHECKS`), :func:`check_topology` on
all of them plus the shared-trunk diagnostics (what ``stream-mtl check`` prints), and
:func:`task_checks` gives one pytest parameter per (task, check)::

    @pytest.mark.parametrize("check", task_checks("yeast"))
    def test_yeast_task(check):
        check()
"""

from __future__ import annotations

import math
import tempfile
import traceback
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from stream_mtl.alerts import Alert
from stream_mtl.checkpoint import CheckpointStore
from stream_mtl.codec import PredictionBatch, TaskBatch, decode_batch
from stream_mtl.diagnostics import TrunkGradients, head_movement, head_vectors, trunk_gradients
from stream_mtl.distributed import ProcessGroup
from stream_mtl.drift import FeatureDriftMonitor
from stream_mtl.ingest import DeadLetter, EventValidator
from stream_mtl.pipeline import IngestStage, task_frames
from stream_mtl.topics import TopicNames
from stream_mtl.topology import Topology, TopologyError, load_producer, load_topology, resolve_topology_path
from stream_mtl.trainer import Trainer
from stream_mtl.trainer_host import TrainerHost, TrainerSession

__all__ = [
    "CHECKS",
    "CheckResult",
    "Record",
    "TaskCheck",
    "TopologyDriver",
    "TopologyReport",
    "check_task",
    "check_topology",
    "run_check",
    "sample_events",
    "synthetic_events",
    "task_checks",
]

#: The driver's worker name (in alerts and round ids).
WORKER = "driver"
#: Where the driver's clock starts (seconds since the epoch): a fixed value, so runs repeat exactly.
START_TIME = 1_700_000_000.0
#: Sample events used by the checks when none are given.
DEFAULT_SAMPLE = 300
#: Labelled rows per task at most in the batch the diagnostics are computed on.
DIAGNOSTIC_ROWS = 256


@dataclass(frozen=True)
class Record:
    """A consumed Kafka record as ingest sees it (satisfies :class:`stream_mtl.ingest.SourceRecord`)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int = 0  # ms since the epoch, from the driver's clock


class TopologyDriver:
    """Runs a topology in-process, without a broker, through the agents' own functions.

    ``seed`` seeds the model (and nothing global: the driver keeps its own torch generator state,
    so two drivers can be interleaved). ``checkpoint_dir``: where checkpoints go and are resumed
    from, laid out as a worker's (default: a temporary directory removed by :meth:`close`). Read
    results back with :meth:`predictions`, :meth:`dlq`, :meth:`expired_labels`, :meth:`alerts`,
    :meth:`batches`, :meth:`losses`, :meth:`frames` and :meth:`metrics`; they accumulate over the
    driver's life. Records are consumed in the order they are piped.
    """

    def __init__(
        self,
        topology: Topology,
        seed: int = 0,
        *,
        checkpoint_dir: str | Path | None = None,
        start_time: float = START_TIME,
        app_id: str | None = None,
        device: str = "cpu",
    ):
        self.topology = topology
        self.names = TopicNames(topology, app_id)
        self._now = float(start_time)
        #: some task takes late labels: the labels topic is read and pending examples are swept
        self.late = any(t.label_ttl_s is not None for t in topology.tasks)
        self.ingest = IngestStage(topology, self.names.sources, self.names.labels, clock=self.now)
        self.feature_drift = FeatureDriftMonitor(topology, self.names.app_id, WORKER, clock=self.now)
        self._tmp = tempfile.TemporaryDirectory(prefix="stream-mtl-driver-") if checkpoint_dir is None else None
        root = Path(checkpoint_dir or self._tmp.name)  # type: ignore[union-attr]
        groups = topology.trainer_groups()
        #: each task's trainer group: ``""`` (the shared model) or, for an ``own_trainer`` task, its own name
        self.group_of = {task: group for group, tasks in groups.items() for task in tasks}
        #: the trainer session of each group (``.trainer``: its model, buffers and metrics)
        self.sessions: dict[str, TrainerSession] = {}
        self._hosts: dict[str, TrainerHost] = {}
        self._rng: dict[str, torch.Tensor] = {}
        for group, tasks in groups.items():  # as Pipeline sets up the trainer of a group's worker
            model = topology if len(tasks) == len(topology.tasks) else topology.restricted_to(tasks)
            store = CheckpointStore(root / f"task-{group}" if group else root, model.spec_hash())
            with torch.random.fork_rng(devices=[]):
                session = TrainerSession(
                    model, store, self.names.app_id, WORKER, ProcessGroup(), seed=seed, clock=self.now, device=device
                )
                self._rng[group] = torch.get_rng_state()
            session.trainer.step_listeners.append(self._on_step)
            self.sessions[group] = session
            self._hosts[group] = TrainerHost(lambda session=session: session, process=False)
        self._offsets: dict[tuple[str, int], int] = {}
        self._polls = 0
        self._predictions: list[dict[str, Any]] = []
        self._dead: list[DeadLetter] = []
        self._expired: list[dict[str, Any]] = []
        self._alerts: list[Alert] = []
        self._batches: list[dict[str, int]] = []
        self._losses: list[dict[str, float]] = []
        self._frames: list[bytes] = []

    # -- the clock -----------------------------------------------------------------------------------
    def now(self) -> float:
        """The driver's clock (seconds since the epoch)."""
        return self._now

    def advance_time(self, seconds: float) -> None:
        """Move the clock on, then do what the worker's timer does: train what waits, expire late labels."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        self._now += seconds
        self._quiet()

    # -- input ---------------------------------------------------------------------------------------
    def pipe(self, events: Iterable[Mapping[str, Any] | bytes], *, source: str | None = None) -> None:
        """Feed events (dicts, or raw bytes as a producer would send them) to the source topic.

        A dict with ``"_source"`` goes to that source's topic (default ``source``, else the first);
        a ``{"_label": {...}}`` item is a late label for the labels topic, as in a producer's
        ``events()``. Records are consumed in polls of ``topology.ingest_batch``; once they are all
        in, the stream is quiet and what waits in the buffers is trained on (the worker's idle timer).
        """
        self._consume([self._record(item, source) for item in events])

    def pipe_labels(self, labels: Iterable[Mapping[str, Any] | bytes]) -> None:
        """Feed late labels ``{"id", "task", "value", "ts"?, "meta"?}`` (or raw bytes) to the labels topic."""
        self._consume([self._label_record(lab) for lab in labels])

    def _record(self, item: Mapping[str, Any] | bytes, source: str | None) -> Record:
        if isinstance(item, bytes | bytearray):
            return self._append(self._source_topic(source), None, bytes(item))
        if not isinstance(item, Mapping):
            raise TypeError(f"an event is a dict or bytes, not {type(item).__name__}")
        if "_label" in item:
            return self._label_record(item["_label"])
        event = dict(item)
        topic = self._source_topic(event.pop("_source", None) or source)
        eid = event.get(self.topology.schema.id_field)
        return self._append(topic, None if eid is None else str(eid).encode(), orjson.dumps(event))

    def _label_record(self, label: Mapping[str, Any] | bytes) -> Record:
        if not self.late:
            raise ValueError(
                f"no task of {self.topology.name!r} takes late labels (label_ttl_s): nothing reads {self.names.labels}"
            )
        if isinstance(label, bytes | bytearray):
            return self._append(self.names.labels, None, bytes(label))
        eid = label.get("id")
        return self._append(self.names.labels, None if eid is None else str(eid).encode(), orjson.dumps(label))

    def _source_topic(self, source: str | None) -> str:
        if source is None:
            return self.names.source
        if source not in self.topology.sources:
            raise ValueError(f"unknown source {source!r} (sources: {', '.join(self.topology.sources)})")
        return self.names.source_topic(source)

    def _append(self, topic: str, key: bytes | None, value: bytes) -> Record:
        partition = self._partition(key)
        offset = self._offsets.get((topic, partition), 0)
        self._offsets[(topic, partition)] = offset + 1
        return Record(topic, partition, offset, key, value, int(self._now * 1000))

    def _partition(self, key: bytes | None) -> int:
        """Kafka's default partitioner (murmur2 of the key); a record without a key goes to partition 0."""
        n = self.topology.partitions
        if key is None or n == 1:
            return 0
        from aiokafka.partitioner import DefaultPartitioner

        parts = list(range(n))
        return int(DefaultPartitioner()(key, parts, parts))

    def _consume(self, records: list[Record]) -> None:
        size = self.topology.ingest_batch
        for start in range(0, len(records), size):
            poll: dict[tuple[str, int], list[Record]] = {}
            for rec in records[start : start + size]:
                poll.setdefault((rec.topic, rec.partition), []).append(rec)
            self._poll(poll)
        self._quiet()

    def _poll(self, data: dict[tuple[str, int], list[Record]]) -> None:
        """One poll, as the ingest service and then the trainer agent handle it."""
        out = self.ingest.process(data)
        if self.feature_drift.columns:
            for x, partition, last in out.features:
                self._alerts.extend(self.feature_drift.observe(x, partition, last))
        self._dead.extend(out.dead)
        self._polls += 1
        msgs = task_frames(out, f"{WORKER}:{self._polls}", self.topology.partitions, self.group_of)
        self._frames.extend(frame for _task, _partition, frame in msgs)
        for group in self.sessions:  # each group's frames to its trainer, as its task topics carry them
            frames = [frame for task, _partition, frame in msgs if self.group_of[task] == group]
            if not frames:
                continue
            outputs, _pending_changes, alerts = self._call(group, "process", frames)
            self._alerts.extend(Alert.from_json(a) for a in alerts)
            for output in outputs:
                if len(output) == 2:
                    self._expired.extend(orjson.loads(record) for _eid, record in output[1])
                else:
                    self._predictions.extend(PredictionBatch.from_json(output[1]).rows())

    def _quiet(self) -> None:
        """The workers' timer on a quiet stream: train what waits, then expire pending past their TTL."""
        for group, host in self._hosts.items():
            if host.status["pending"]:
                self._call(group, "train")
            if self.late:
                expired, _pending_changes = self._call(group, "sweep")
                self._expired.extend(orjson.loads(record) for _eid, record in expired)

    def _call(self, group: str, name: str, *args: Any) -> Any:
        """A call to a group's trainer session (as the agents make it), with its own torch generator state."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng[group])
            try:
                return self._hosts[group].call_sync(name, *args)
            finally:
                self._rng[group] = torch.get_rng_state()

    def _group(self, group: str | None) -> str:
        if group is None:
            return "" if "" in self.sessions else next(iter(self.sessions))
        if group not in self.sessions:
            raise KeyError(f"no trainer group {group!r} (groups: {', '.join(map(repr, self.sessions))})")
        return group

    def trainer(self, task: str | None = None) -> Trainer:
        """The :class:`~stream_mtl.trainer.Trainer` that trains ``task`` (default: the shared model's)."""
        return self.sessions[self.group_of[task] if task is not None else self._group(None)].trainer

    def _on_step(self, composition: dict[str, int], losses: dict[str, float]) -> None:
        self._batches.append(dict(composition))
        self._losses.append(dict(losses))

    # -- output --------------------------------------------------------------------------------------
    def predictions(self, task: str | None = None) -> list[dict[str, Any]]:
        """Prediction rows ``{"id", "task", "prediction", "score", "model_version"}`` in the order made."""
        return [r for r in self._predictions if task is None or r["task"] == task]

    def dlq(self) -> list[DeadLetter]:
        """Dead letters: the original bytes, ``stage``, ``error_class``, ``reason`` and source position."""
        return list(self._dead)

    def expired_labels(self) -> list[dict[str, Any]]:
        """Late labels that found no example: ``{"id", "task", "value", "ts", "meta", "reason"}``."""
        return list(self._expired)

    def alerts(self) -> list[Alert]:
        """Drift alerts and the actions taken on them (tasks' and shared features')."""
        return list(self._alerts)

    def batches(self) -> list[dict[str, int]]:
        """The task composition (rows per task) of each training mini-batch, in order."""
        return [dict(b) for b in self._batches]

    def losses(self) -> list[dict[str, float]]:
        """The per-task losses of each training step, in order."""
        return [dict(x) for x in self._losses]

    def frames(self, task: str | None = None) -> list[TaskBatch]:
        """The task frames the ingest stage produced (decoded), in order."""
        out = [decode_batch(f) for f in self._frames]
        return [b for b in out if task is None or b.task == task]

    def metrics(self, group: str | None = None) -> dict[str, Any]:
        """A trainer's metrics snapshot (what its worker publishes), with the ingest counters.

        ``group``: the trainer group (an ``own_trainer`` task's name); default: the shared model.
        """
        snap = self._call(self._group(group), "snapshot")
        ing = self.ingest
        snap["ingest"] = {"records": ing.records, "events": ing.valid, "dlq": ing.dead, "labels": ing.labels}
        return snap

    def checkpoint(self) -> dict[str, str | None]:
        """Each trainer group writes a checkpoint if its model changed since its last one; the file names."""
        return {group: self._call(group, "checkpoint") for group in self.sessions}

    def close(self) -> None:
        """Stop the trainer sessions and remove the temporary checkpoint directory (idempotent)."""
        for host in self._hosts.values():
            host.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> TopologyDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- sample data ---------------------------------------------------------------------------------------

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


# -- per-task checks -----------------------------------------------------------------------------------

#: Each check's name and what it verifies.
CHECKS: dict[str, str] = {
    "runs": "the task (with the tasks it depends on) runs through the pipeline on the sample: "
    "its where= predicate and its loss do not raise, and events reach it",
    "deterministic": "the same seed and events give the same task frames, predictions, batches and losses",
    "labels": "every label of the task in the sample (on events and late) has the declared type",
    "augmentation": "augmentation touches training copies only: without it, the predicted inputs and the "
    "predictions made before any training are the same",
    "malformed": "an event with a malformed label for the task goes to the DLQ with a reason, and every other "
    "event is still predicted for every task",
    "gradient": "the task's head receives a non-zero gradient and its parameters change when it trains",
    "finite_loss": "every training loss of the task and every prediction score is finite",
}


#: Checks that cannot say anything about a task whose run stops with an error.
_NEEDS_A_RUN = frozenset({"deterministic", "augmentation", "malformed", "gradient", "finite_loss"})


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check of one task."""

    task: str
    check: str
    passed: bool
    reason: str = ""

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.task} {self.check}: {verdict}" + (f" ({self.reason})" if self.reason else "")


@dataclass
class _Run:
    """What one driver run over some events gave (or the error that stopped it)."""

    tasks: list[str]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    batches: list[dict[str, int]] = field(default_factory=list)
    losses: list[dict[str, float]] = field(default_factory=list)
    frames: list[TaskBatch] = field(default_factory=list)
    movement: dict[str, float] = field(default_factory=dict)
    #: per trainer group (``""``: the shared model), the trunk and head gradients of its trained model
    gradients: dict[str, TrunkGradients] = field(default_factory=dict)
    error: str | None = None

    def head_norm(self, task: str) -> float | None:
        """The norm of the gradient reaching the task's head (``None``: none reaches it, or not computed)."""
        return next((g.head_norm.get(task) for g in self.gradients.values() if task in g.head_norm), None)


def _describe(exc: BaseException) -> str:
    """``Type: message``, and the last place in the user's code it came from."""
    here = str(Path(__file__).resolve().parent)
    where = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        fname = str(Path(frame.filename).resolve())
        if not fname.startswith(here) and "site-packages" not in fname:
            where = f" (in {frame.name}, {Path(fname).name}:{frame.lineno})"
            break
    return f"{type(exc).__name__}: {exc}{where}"


def _with_tasks(topology: Topology, tasks: list[Any]) -> Topology:
    """The topology with other tasks (validated again)."""
    data = {name: getattr(topology, name) for name in Topology.model_fields}
    data["tasks"] = tasks
    return Topology(**data)


def _subset(topology: Topology, names: Iterable[str]) -> Topology:
    """The topology with only these tasks (in their order)."""
    keep = set(names)
    return _with_tasks(topology, [t for t in topology.tasks if t.name in keep])


def _required(topology: Topology, name: str) -> list[str]:
    """A task and the tasks it depends on (transitively), in the topology's order."""
    need, stack = set(), [name]
    while stack:
        t = stack.pop()
        if t not in need:
            need.add(t)
            stack.extend(topology.task(t).depends_on)
    return [t.name for t in topology.tasks if t.name in need]


class _Checker:
    """Runs the checks of a topology's tasks on one sample, sharing (and caching) the driver runs."""

    def __init__(self, topology: Topology, events: Iterable[Any] | None, seed: int = 0):
        self.topology = topology
        self.seed = seed
        self._events_in = events
        self._runs: dict[tuple[Any, ...], _Run] = {}
        self._results: dict[str, dict[str, CheckResult]] = {}
        self._validators = {src: EventValidator(topology, src) for src in topology.sources}

    @cached_property
    def events(self) -> list[Any]:
        if self._events_in is None:
            return synthetic_events(self.topology, DEFAULT_SAMPLE, self.seed)
        return list(self._events_in)

    def _source_events(self, name: str) -> Iterable[tuple[dict[str, Any], dict[str, Any]]]:
        """``(item, event)`` for each sample event of the task's source that passes validation
        (the only ones a predicate or the model ever sees); ``event`` without ``"_source"``."""
        task = self.topology.task(name)
        for item in self.events:
            if not isinstance(item, Mapping) or "_label" in item:
                continue
            src = str(item.get("_source") or self.topology.sources[0])
            if task.source is not None and src != task.source:
                continue
            event = {k: v for k, v in item.items() if k != "_source"}
            if src in self._validators and self._validators[src].check(event) is None:
                yield dict(item), event

    # -- runs --------------------------------------------------------------------------------------
    def run(self, names: list[str], variant: str = "sample", cache: bool = True) -> _Run:
        key = (tuple(names), variant)
        if cache and key in self._runs:
            return self._runs[key]
        topology = _subset(self.topology, names)
        events = self.events
        if variant == "no_augment":  # the last task's augmentation stripped
            tasks = [t.model_copy(update={"augment": []}) if t.name == names[-1] else t for t in topology.tasks]
            topology = _with_tasks(topology, tasks)
        elif variant.startswith("malformed:"):
            events = self._with_malformed(variant.split(":", 1)[1])
        run = self._drive(topology, events)
        if cache:
            self._runs[key] = run
        return run

    def _drive(self, topology: Topology, events: list[Any]) -> _Run:
        run = _Run([t.name for t in topology.tasks])
        late = {t.name for t in topology.tasks if t.label_ttl_s is not None}
        events = [  # the late labels of tasks that are not in this run have nobody to go to
            e
            for e in events
            if not (isinstance(e, Mapping) and isinstance(e.get("_label"), Mapping)) or e["_label"].get("task") in late
        ]
        with TopologyDriver(topology, seed=self.seed) as driver:
            models = {group: s.trainer.model for group, s in driver.sessions.items()}
            before = {group: head_vectors(model) for group, model in models.items()}
            try:
                driver.pipe(events)
            except Exception as exc:
                run.error = _describe(exc)
            run.predictions, run.dead = driver.predictions(), driver.dlq()
            run.batches, run.losses, run.frames = driver.batches(), driver.losses(), driver.frames()
            for group, model in models.items():
                run.movement.update(head_movement(before[group], model))
            if run.error is None:
                try:
                    run.gradients = {group: self._gradients(driver, group) for group in driver.sessions}
                except Exception as exc:
                    run.error = _describe(exc)
        return run

    def _gradients(self, driver: TopologyDriver, group: str) -> TrunkGradients:
        """Trunk and head gradients of a group's trained model on (up to) the sample's labelled rows of its tasks."""
        session = driver.sessions[group]
        trainer = session.trainer
        late = {
            (lab["task"], str(lab["id"])): lab["value"]
            for item in self.events
            if isinstance(item, Mapping) and isinstance(lab := item.get("_label"), Mapping) and "id" in lab
        }
        xs, ys, blocks, start = [], [], {}, 0
        for name in (t.name for t in session.topology.tasks):
            rows_x, rows_y = [], []
            for batch in driver.frames(name):
                if batch.kind != "examples":
                    continue  # late labels: matched to their events' rows from the sample below
                for i, eid in enumerate(batch.ids):
                    y = batch.y[i] if batch.y[i] is not None else late.get((name, eid))
                    if y is not None and len(rows_y) < DIAGNOSTIC_ROWS:
                        rows_x.append(batch.x[i])
                        rows_y.append(y)
            if not rows_y:
                continue
            y = trainer._targets(name, rows_y)
            xs.append(np.stack(rows_x).astype(np.float32))
            ys.append(np.pad(y, ((0, 0), (0, trainer.k_max - y.shape[1]))))
            blocks[name] = (start, start + len(rows_y))
            start += len(rows_y)
        if not blocks:
            return TrunkGradients()
        x = torch.from_numpy(np.concatenate(xs)).to(trainer.device)
        y = torch.from_numpy(np.concatenate(ys)).to(trainer.device)
        trainer.model.eval()
        return trunk_gradients(trainer.model, x, y, blocks, trainer.task_weights)

    def _template(self, name: str) -> dict[str, Any] | None:
        """A valid event of the task's source that carries its label (or any valid one of its source)."""
        label = self.topology.task(name).label
        fallback = None
        for item, event in self._source_events(name):
            if event.get(label) is not None:
                return item
            fallback = fallback or item
        return fallback

    def _with_malformed(self, name: str) -> list[Any]:
        """The sample with, in its middle, an event whose label for this task has the wrong type
        (and, for a task with late labels, a late label with a wrong value)."""
        task = self.topology.task(name)
        template = self._template(name)
        events = list(self.events)
        if template is None:
            return events
        id_field = self.topology.schema.id_field
        bad = {**template, id_field: f"{template[id_field]}-malformed", task.label: "not-a-label"}
        extra: list[Any] = [bad]
        if task.label_ttl_s is not None:
            extra.append({"_label": {"id": f"{template[id_field]}-malformed", "task": name, "value": "not-a-label"}})
        mid = len(events) // 2
        return [*events[:mid], *extra, *events[mid:]]

    @cached_property
    def healthy(self) -> list[str]:
        """Tasks that run alone without an error (what the ``malformed`` check runs beside a task)."""
        tasks = [t.name for t in self.topology.tasks]
        return [t for t in tasks if self._where_error(t) is None and self._alone(t).error is None]

    def _alone(self, name: str) -> _Run:
        return self.run(_required(self.topology, name))

    def _where_error(self, name: str) -> str | None:
        task = self.topology.task(name)
        if task.where is None:
            return None
        id_field = self.topology.schema.id_field
        for _item, event in self._source_events(name):  # an invalid event is dead-lettered before any predicate
            try:
                task.where(event)
            except Exception as exc:
                return f"where= raised on event {event.get(id_field)!r}: {_describe(exc)}"
        return None

    # -- the checks ----------------------------------------------------------------------------------
    def results(self, name: str) -> list[CheckResult]:
        """Every check of one task (computed once)."""
        self.topology.task(name)  # KeyError for an unknown task
        if name not in self._results:
            stopped = name not in self.healthy  # its predicate or the pipeline raised: nothing more to learn
            self._results[name] = {
                c: CheckResult(name, c, False, "not run: the task stops the pipeline (see runs)")
                if stopped and c in _NEEDS_A_RUN
                else CheckResult(name, c, *getattr(self, f"_check_{c}")(name))
                for c in CHECKS
            }
        return list(self._results[name].values())

    def result(self, name: str, check: str) -> CheckResult:
        if check not in CHECKS:
            raise KeyError(f"unknown check {check!r} (checks: {', '.join(CHECKS)})")
        self.results(name)
        return self._results[name][check]

    def _check_runs(self, name: str) -> tuple[bool, str]:
        where = self._where_error(name)
        if where is not None:
            return False, where
        run = self._alone(name)
        if run.error is not None:
            return False, f"the pipeline stopped: {run.error}"
        n = sum(1 for r in run.predictions if r["task"] == name)
        if n == 0:
            return False, "no event of the sample reaches it (its source, where= or label filter out every one)"
        learned = sum(b.get(name, 0) for b in run.batches)
        return True, f"{n} predictions, {learned} rows learned"

    def _check_deterministic(self, name: str) -> tuple[bool, str]:
        first, second = self._alone(name), self.run(_required(self.topology, name), cache=False)
        if first.error or second.error:
            return False, f"the pipeline stopped: {first.error or second.error}"
        if len(first.frames) != len(second.frames) or any(
            a.ids != b.ids
            or a.y != b.y
            or not np.array_equal(a.x, b.x)
            or (a.x_train is None) != (b.x_train is None)
            or (a.x_train is not None and not np.array_equal(a.x_train, b.x_train))
            for a, b in zip(first.frames, second.frames, strict=False)
        ):
            return False, "the task frames (features, routing, text augmentation) differ between two runs"
        for a, b in zip(first.predictions, second.predictions, strict=False):
            if a != b:
                return False, f"predictions differ between two runs, first at event {a['id']!r} ({a['task']})"
        if len(first.predictions) != len(second.predictions):
            return False, "the two runs made different numbers of predictions"
        if first.batches != second.batches or first.losses != second.losses:
            return False, "the training batches or losses differ between two runs"
        return True, f"{len(first.predictions)} predictions and {len(first.losses)} steps repeat exactly"

    def _check_labels(self, name: str) -> tuple[bool, str]:
        task = self.topology.task(name)
        validator = EventValidator(self.topology)
        id_field = self.topology.schema.id_field
        n, bad = 0, []
        for item in self.events:
            if not isinstance(item, Mapping):
                continue
            lab = item.get("_label")
            if isinstance(lab, Mapping):
                if lab.get("task") != name or lab.get("value") is None:
                    continue
                eid, value = lab.get("id"), lab["value"]
            else:
                if task.source is not None and str(item.get("_source") or self.topology.sources[0]) != task.source:
                    continue
                if item.get(task.label) is None:
                    continue
                eid, value = item.get(id_field), item[task.label]
            n += 1
            reason = validator.check_label(task.label, value)
            if reason is not None:
                bad.append(f"event {eid!r}: {reason}")
        if bad:
            return False, f"{len(bad)} of {n} labels have the wrong type; first: {bad[0]}"
        if n == 0:
            return False, f"no event of the sample carries its label {task.label!r} (nor a late label): it cannot learn"
        return True, f"{n} labels of kind {task.kind}"

    def _check_augmentation(self, name: str) -> tuple[bool, str]:
        task = self.topology.task(name)
        if not task.augment:
            return True, "no augmentation declared"
        names = _required(self.topology, name)
        names = [*(n for n in names if n != name), name]  # the variant strips the last task's augmentation
        with_aug, without = self.run(names), self.run(names, variant="no_augment")
        if with_aug.error or without.error:
            return False, f"the pipeline stopped: {with_aug.error or without.error}"
        fa = [b for b in with_aug.frames if b.task == name]
        fb = [b for b in without.frames if b.task == name]
        if len(fa) != len(fb) or any(
            a.ids != b.ids or not np.array_equal(a.x, b.x) for a, b in zip(fa, fb, strict=False)
        ):
            return False, "augmentation changed the inputs that are predicted (the frames' x), not only training copies"

        def before_training(run: _Run) -> list[tuple[Any, ...]]:
            return [
                (r["id"], r["prediction"], r["score"])
                for r in run.predictions
                if r["task"] == name and r["model_version"].endswith("-0")
            ]

        pa, pb = before_training(with_aug), before_training(without)
        if pa != pb:
            return False, "predictions made before any training differ with and without augmentation"
        copies = sum(1 for b in fa if b.x_train is not None)
        extra = sum(b.get(name, 0) for b in with_aug.batches) - sum(b.get(name, 0) for b in without.batches)
        kinds = ", ".join(sorted({a.kind for a in task.augment}))
        return True, (
            f"{kinds}: {len(pa)} predictions before training identical; {copies} frames with training copies"
            + (f"; {extra:+d} training rows" if extra else "")
        )

    def _check_malformed(self, name: str) -> tuple[bool, str]:
        task = self.topology.task(name)
        template = self._template(name)
        if template is None:
            return False, "the sample has no valid event of its source to corrupt"
        keep = {*self.healthy, *_required(self.topology, name)}
        names = [t.name for t in self.topology.tasks if t.name in keep]
        base, bad = self.run(names), self.run(names, variant=f"malformed:{name}")
        if bad.error is not None:
            return False, f"the pipeline stopped on the malformed event: {bad.error}"
        if base.error is not None:
            return False, f"the pipeline stopped on the sample: {base.error}"
        bad_id = f"{template[self.topology.schema.id_field]}-malformed"
        dead = [d for d in bad.dead if d.key == bad_id.encode()]
        if not dead:
            return False, f"the event with a malformed {task.label!r} did not reach the DLQ"
        letter = next((d for d in dead if d.stage != "labels"), dead[0])
        if not letter.reason or task.label not in letter.reason:
            return False, f"its dead letter does not name the field {task.label!r} (reason: {letter.reason!r})"
        if task.label_ttl_s is not None and not any(d.stage == "labels" for d in dead):
            return False, "the malformed late label did not reach the DLQ"
        if any(r["id"] == bad_id for r in bad.predictions):
            return False, "the malformed event was predicted"
        seen = {(r["task"], r["id"]) for r in bad.predictions}
        want = {(r["task"], r["id"]) for r in base.predictions}
        if seen != want:
            lost = sorted({t for t, _ in want - seen})
            return False, f"other events stopped being predicted (tasks {', '.join(lost) or '?'})"
        others = len(names) - 1
        return True, f"dead-lettered ({letter.stage}: {letter.reason}); {others} other tasks went on"

    def _check_gradient(self, name: str) -> tuple[bool, str]:
        run = self._alone(name)
        if run.error is not None:
            return False, f"the pipeline stopped: {run.error}"
        steps = sum(1 for b in run.batches if b.get(name))
        if steps == 0:
            return False, "no training step included it"
        norm = run.head_norm(name)
        if norm is None:
            return False, f"its loss does not reach its head: no gradient flows into heads.{name}"
        if not math.isfinite(norm) or norm == 0:
            return False, f"its head's gradient is {norm:g}"
        moved = run.movement.get(name, 0.0)
        if moved == 0:
            return False, f"its head's parameters did not change in {steps} training steps"
        return True, f"head gradient norm {norm:.3g}; head moved {moved:.1%} in {steps} steps"

    def _check_finite_loss(self, name: str) -> tuple[bool, str]:
        run = self._alone(name)
        if run.error is not None:
            return False, f"the pipeline stopped: {run.error}"
        losses = [(i + 1, step[name]) for i, step in enumerate(run.losses) if name in step]
        if not losses:
            return False, "no training step included it"
        for step, value in losses:
            if not math.isfinite(value):
                return False, f"its loss is {value} at step {step}"
        for r in run.predictions:
            if r["task"] == name and not all(math.isfinite(s) for s in np.ravel(r["score"])):
                return False, f"prediction score of event {r['id']!r} is not finite"
        return True, f"{len(losses)} losses, last {losses[-1][1]:.4g}"

    # -- the whole topology --------------------------------------------------------------------------
    def report(self) -> TopologyReport:
        results = {t.name: self.results(t.name) for t in self.topology.tasks}
        healthy = self.healthy
        run = self.run(healthy) if healthy else None
        return TopologyReport(
            self.topology,
            results,
            run.gradients if run is not None else {},
            run.movement if run is not None else {},
            sum(1 for e in self.events if not (isinstance(e, Mapping) and "_label" in e)),
            sum(1 for e in self.events if isinstance(e, Mapping) and "_label" in e),
            run.error if run is not None else "no task runs",
        )


def _as_topology(topology: Topology | str | Path) -> Topology:
    return topology if isinstance(topology, Topology) else load_topology(topology)


def _default_events(topology: Topology | str | Path, events: Iterable[Any] | None, seed: int) -> Iterable[Any] | None:
    if events is None and not isinstance(topology, Topology):
        return sample_events(topology, DEFAULT_SAMPLE, seed)[0]
    return events


def check_task(
    topology: Topology | str | Path, task_name: str, events: Iterable[Any] | None = None, *, seed: int = 0
) -> list[CheckResult]:
    """Run every check of :data:`CHECKS` on one task; one :class:`CheckResult` per check.

    ``events``: the sample (dicts, bytes, ``{"_label": …}`` items); default: the first
    :data:`DEFAULT_SAMPLE` events of the topology's producer when ``topology`` is a name or path,
    else :func:`synthetic_events`. Each task runs alone (with the tasks it depends on), so one
    broken task does not fail the others; ``malformed`` runs it beside every task that runs.
    """
    topo = _as_topology(topology)
    return _Checker(topo, _default_events(topology, events, seed), seed).results(task_name)


@dataclass
class TopologyReport:
    """Every task's check results and the shared-trunk diagnostics of a topology on a sample."""

    topology: Topology
    results: dict[str, list[CheckResult]]
    #: per trainer group (``""``: the shared model; an ``own_trainer`` task: its own model), the trunk
    #: gradients of the tasks that run, on the model trained on the sample
    gradients: dict[str, TrunkGradients]
    #: how far each head moved while training on the sample (relative L2 change)
    movement: dict[str, float]
    #: sample events, and late labels among them
    events: int
    labels: int = 0
    diagnostics_error: str | None = None

    @property
    def ok(self) -> bool:
        return all(r.passed for rs in self.results.values() for r in rs)

    def failures(self) -> list[CheckResult]:
        return [r for rs in self.results.values() for r in rs if not r.passed]

    def trunk(self, task: str) -> TrunkGradients | None:
        """The diagnostics of the model that trains ``task`` (``None``: the task does not run)."""
        return next((g for g in self.gradients.values() if task in g.share), None)

    def table(self) -> Any:
        """A ``rich`` table: per task pass/fail with reasons, trunk gradient share, worst conflict."""
        from rich.table import Table

        labels = f" + {self.labels} late labels" if self.labels else ""
        table = Table(title=f"stream-mtl check: {self.topology.name} ({self.events} sample events{labels})")
        table.add_column("task", style="bold")
        table.add_column("checks")
        table.add_column("failures")
        table.add_column("trunk grad share", justify="right")
        table.add_column("worst conflict")
        table.add_column("head moved", justify="right")
        for name, results in self.results.items():
            failed = [r for r in results if not r.passed]
            verdict = (
                f"[green]pass[/green] {len(results)}/{len(results)}"
                if not failed
                else f"[red]FAIL[/red] {len(results) - len(failed)}/{len(results)}"
            )
            g = self.trunk(name)
            share = f"{g.share[name]:.1%}" if g is not None else "-"
            worst = g.worst_conflict().get(name) if g is not None else None
            conflict = (
                f"{worst[0]} ({worst[1]:+.2f})" if worst else ("alone in its model" if g and len(g.share) == 1 else "-")
            )
            moved = f"{self.movement[name]:.1%}" if name in self.movement else "-"
            lines = [f"{r.check}: {r.reason}" for r in failed if not r.reason.startswith("not run")]
            skipped = [r.check for r in failed if r.reason.startswith("not run")]
            if skipped:
                lines.append(f"not run (it stops the pipeline): {', '.join(skipped)}")
            reasons = "\n".join(lines) or "-"
            table.add_row(name, verdict, reasons, share, conflict, moved)
        return table


def check_topology(
    topology: Topology | str | Path, events: Iterable[Any] | None = None, *, seed: int = 0
) -> TopologyReport:
    """Every task's checks and the shared-trunk diagnostics (``events`` as for :func:`check_task`)."""
    return _Checker(_as_topology(topology), _default_events(topology, events, seed), seed).report()


class TaskCheck:
    """One (task, check) pair, run when called (on first use, with the other checks of its task)."""

    def __init__(self, checker: _Checker, task: str, check: str):
        self.checker, self.task, self.check = checker, task, check

    def result(self) -> CheckResult:
        return self.checker.result(self.task, self.check)

    def __call__(self) -> CheckResult:
        """The result; raises ``AssertionError`` with the reason when the check fails."""
        res = self.result()
        if not res.passed:
            raise AssertionError(f"task {self.task!r}, check {self.check!r} ({CHECKS[self.check]}): {res.reason}")
        return res

    def __repr__(self) -> str:
        return f"TaskCheck({self.task!r}, {self.check!r})"


def task_checks(topology: Topology | str | Path, events: Iterable[Any] | None = None, *, seed: int = 0) -> list[Any]:
    """``pytest.param`` per (task, check), id ``<task>-<check>``, for ``pytest.mark.parametrize``.

    Nothing runs at collection: each :class:`TaskCheck` runs its task's checks when first called
    (shared by the checks of that task)::

        @pytest.mark.parametrize("check", task_checks("yeast"))
        def test_task(check):
            check()
    """
    import pytest

    topo = _as_topology(topology)
    checker = _Checker(topo, _default_events(topology, events, seed), seed)
    return [pytest.param(TaskCheck(checker, t.name, c), id=f"{t.name}-{c}") for t in topo.tasks for c in CHECKS]


def run_check(ref: str | Path, n_events: int = DEFAULT_SAMPLE, seed: int = 0, console: Any = None) -> int:
    """``stream-mtl check``: validate the topology, check every task on sample data, print a table.

    Returns the exit status: 0 when every check passes, 1 when one fails, 2 when the topology is invalid.
    """
    from rich.console import Console

    console = console or Console(width=160)
    try:
        topology = load_topology(ref)
        path = resolve_topology_path(ref)
    except TopologyError as exc:
        console.print(f"[red]invalid topology[/red]: {exc}", markup=True, highlight=False)
        return 2
    try:
        events, origin = sample_events(ref, n_events, seed)
    except Exception as exc:  # the producer itself fails: say so, and check the tasks on generated events
        events = synthetic_events(topology, n_events, seed)
        origin = f"{n_events} synthetic events ([yellow]producer.py failed[/yellow]: {_describe(exc)})"
    console.print(
        f"topology {topology.name!r} ({_shown(path)}): valid; {len(topology.tasks)} tasks, "
        f"input width {topology.input_dim}",
        highlight=False,
    )
    console.print(f"sample: {origin}", highlight=False, markup=True)
    report = _Checker(topology, events, seed).report()
    console.print(report.table())
    if report.diagnostics_error:
        console.print(f"diagnostics: {report.diagnostics_error}", highlight=False)
    else:
        console.print(
            f"trunk grad share and worst conflict: on the model trained on the sample, ≤ {DIAGNOSTIC_ROWS} labelled "
            "rows per task\n(conflict: the task whose trunk gradient has the lowest cosine with this one's); "
            "head moved: ‖Δθ‖/‖θ₀‖ over the sample",
            highlight=False,
        )
    failed = report.failures()
    if failed:
        tasks = sorted({r.task for r in failed})
        console.print(f"[red]FAILED[/red]: {len(failed)} checks of {len(tasks)} tasks ({', '.join(tasks)})")
        return 1
    n = sum(len(rs) for rs in report.results.values())
    console.print(f"[green]ok[/green]: {n} checks of {len(report.results)} tasks passed")
    return 0
