"""The in-process topology driver: a topology run without a broker, through the agents' own functions.

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
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import torch

from stream_mtl.alerts import Alert
from stream_mtl.checkpoint import CheckpointStore
from stream_mtl.codec import PredictionBatch, TaskBatch, decode_batch
from stream_mtl.distributed import ProcessGroup
from stream_mtl.drift import FeatureDriftMonitor
from stream_mtl.ingest import DeadLetter
from stream_mtl.pipeline import IngestStage, task_frames
from stream_mtl.topics import TopicNames
from stream_mtl.topology import Topology
from stream_mtl.trainer import Trainer
from stream_mtl.trainer_host import TrainerHost, TrainerSession

__all__ = ["START_TIME", "WORKER", "Record", "TopologyDriver"]

#: The driver's worker name (in alerts and round ids).
WORKER = "driver"
#: Where the driver's clock starts (seconds since the epoch): a fixed value, so runs repeat exactly.
START_TIME = 1_700_000_000.0


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
