"""The ingest half of the pipeline as plain functions: decode → validate → features → route.

:class:`IngestStage` holds the shared feature state (one :class:`~stream_mtl.features.FeatureSet`
per source partition, so a partition's owner is its only writer), turns late labels read from
``<app>.labels`` into label frames for the task topics, and keeps per-stage timings. The Faust
ingest service calls :meth:`IngestStage.process` on each polled batch; tests and the benchmark
call the same method, and :func:`task_frames` turns its output into the task-topic messages for
both (the Faust service sends them; :class:`~stream_mtl.testing.TopologyDriver` hands them to the trainer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_mtl.codec import TaskBatch, encode_batch
from stream_mtl.features import FeatureSet, RawBatch, TextHasher, make_extractor
from stream_mtl.ingest import DeadLetter, EventValidator, SourceRecord, ingest_records
from stream_mtl.labels import parse_labels
from stream_mtl.routing import Router
from stream_mtl.topology import Topology

__all__ = ["IngestOutput", "IngestStage", "task_frames"]


@dataclass
class IngestOutput:
    """What one polled batch turns into."""

    batches: list[TaskBatch] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    table_updates: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # coalesced; None = delete
    #: the source partition each updated key belongs to (its changelog partition)
    table_partitions: dict[str, int] = field(default_factory=dict)
    valid: int = 0
    labels: int = 0
    #: the shared feature matrix of each source partition, with that partition and its last offset
    features: list[tuple[np.ndarray, str, int]] = field(default_factory=list)


class IngestStage:
    """Decode, validate, featurise and route batches of source records; forward late labels.

    ``topics`` maps each source topic to its source name (``<app>.<source>`` → ``source``);
    ``labels_topic`` is where late labels arrive.
    """

    def __init__(
        self,
        topology: Topology,
        topics: Mapping[str, str] | None = None,
        labels_topic: str | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.topology = topology
        self.topics = dict(topics) if topics is not None else {f"{topology.name}.{s}": s for s in topology.sources}
        self.labels_topic = labels_topic
        self.clock = clock
        self.validators = {src: EventValidator(topology, src) for src in topology.sources}
        self.label_validator = EventValidator(topology)
        text = {
            f.name: ex
            for f in topology.features
            if f.kind == "text" and isinstance(ex := make_extractor(f), TextHasher)
        }
        self.router = Router(topology, text)
        self.feature_sets: dict[tuple[str, int], FeatureSet] = {}
        self.time_field = topology.schema.time_field
        self.timings = {"decode_validate": 0.0, "features": 0.0, "route": 0.0}
        self.records = 0
        self.valid = 0
        self.dead = 0
        self.labels = 0

    def feature_set(self, topic: str, partition: int) -> FeatureSet:
        """The feature state of one source partition (created empty on first use)."""
        fs = self.feature_sets.get((topic, partition))
        if fs is None:
            fs = self.feature_sets[(topic, partition)] = FeatureSet(
                self.topology, self.topics[topic], topic, partition, clock=self.clock
            )
        return fs

    def reset_partition(self, topic: str, partition: int) -> list[str]:
        """Forget one source partition's feature state (it is about to be restored); its table keys' bases."""
        self.feature_sets.pop((topic, partition), None)
        fs = self.feature_set(topic, partition)
        return [fs.key(name) for name in fs.extractors]

    def partitions(self) -> set[tuple[str, int]]:
        """The source partitions whose feature state this stage holds."""
        return set(self.feature_sets)

    def drop_partitions_except(self, keep: list[tuple[str, int]]) -> None:
        """Forget the feature state of source partitions this worker no longer owns (bounded memory)."""
        for tp in set(self.feature_sets) - set(keep):
            del self.feature_sets[tp]

    def load_state(self, topic: str, partition: int, items: list[tuple[str, Any]]) -> int:
        """Restore one source partition's feature state from feature-table items."""
        return self.feature_set(topic, partition).load(items)

    def feature_counts(self) -> dict[str, int]:
        """Events counted by each running standardiser, by table key."""
        out: dict[str, int] = {}
        for fs in self.feature_sets.values():
            out.update(fs.counts())
        return out

    def process(self, partitions: Mapping[Any, list[SourceRecord]]) -> IngestOutput:
        """One poll (records grouped by partition) → task batches, dead letters, table updates."""
        out = IngestOutput()
        for recs in partitions.values():
            if not recs:
                continue
            first = len(out.batches)
            if recs[0].topic == self.labels_topic:
                self._process_labels(recs, out)
            else:
                self._process_partition(recs, out)
            for batch in out.batches[first:]:
                batch.partition = recs[0].partition
        return out

    def _dead_letter_failures(self, recs: list[SourceRecord], offsets: list[int], out: IngestOutput) -> None:
        """Dead letters (stage ``route``) for the events whose task predicate raised; the original bytes."""
        by_offset = {rec.offset: rec for rec in recs}
        for i, task, exc in self.router.failures:
            rec = by_offset[offsets[i]]
            out.dead.append(
                DeadLetter(
                    rec.value,
                    rec.key,
                    "route",
                    type(exc).__name__,
                    _where_reason(task, exc),
                    rec.topic,
                    rec.partition,
                    rec.offset,
                )
            )
        self.dead += len(self.router.failures)

    def _process_labels(self, recs: list[SourceRecord], out: IngestOutput) -> None:
        t0 = time.perf_counter()
        frames, dead = parse_labels(recs, self.topology, self.clock, self.label_validator)
        out.batches.extend(frames)
        out.dead.extend(dead)
        n = sum(len(f) for f in frames)
        out.labels += n
        self.labels += n
        self.dead += len(dead)
        self.timings["decode_validate"] += time.perf_counter() - t0

    def _process_partition(self, recs: list[SourceRecord], out: IngestOutput) -> None:
        t0 = time.perf_counter()
        topic, partition = recs[0].topic, recs[0].partition
        source = self.topics[topic]
        validator = self.validators[source]
        res = ingest_records(recs, validator)
        t1 = time.perf_counter()
        out.dead.extend(res.dead)
        out.valid += len(res.events)
        self.records += len(recs)
        self.valid += len(res.events)
        self.dead += len(res.dead)
        if res.events:
            fs = self.feature_set(topic, partition)
            numeric = np.array(res.values, dtype=np.float64).reshape(len(res.events), len(validator.required))
            times = numeric[:, validator.required.index(self.time_field)] if self.time_field else None
            offsets = np.asarray(res.offsets, dtype=np.int64)
            batch = RawBatch(res.events, numeric, validator.required, times, offsets=offsets)
            x = fs.transform(batch)
            out.features.append((x, f"{topic}:{partition}", res.offsets[-1]))
            updates = fs.table_updates()
            out.table_updates.update(updates)
            out.table_partitions.update(dict.fromkeys(updates, partition))
            t2 = time.perf_counter()
            out.batches.extend(
                self.router.route(res.events, res.offsets, x, source, f"{topic}:{partition}", res.columns, batch.tokens)
            )
            if self.router.failures:  # a task's where= raised: the event goes to the DLQ for it, not the stream down
                self._dead_letter_failures(recs, res.offsets, out)
            self.timings["features"] += t2 - t1
            self.timings["route"] += time.perf_counter() - t2
        self.timings["decode_validate"] += t1 - t0


def _where_reason(task: str, exc: Exception) -> str:
    return f"tasks.{task}.where raised {type(exc).__name__}: {exc}"[:500]


def task_frames(
    out: IngestOutput, round_id: str, partitions: int, group_of: Mapping[str, str] | None = None
) -> list[tuple[str, int, bytes]]:
    """The task-topic messages of one poll: ``(task, partition, frame)`` per task batch, in order.

    Every batch of the poll is tagged with its round (``round_id``, and how many frames of the round
    go to the same trainer group, ``group_of[task]``: a trainer trains once it has seen them all) and
    goes to the partition of its task topic numbered like the source partition it came from.

    >>> import numpy as np
    >>> from stream_mtl.codec import decode_batch
    >>> out = IngestOutput(batches=[TaskBatch("a", ["e1"], np.zeros((1, 2), np.float32), [1.0], partition=3),
    ...                             TaskBatch("b", ["e1"], np.zeros((1, 2), np.float32), [0.0], partition=3)])
    >>> msgs = task_frames(out, "w:1", partitions=2)
    >>> [(task, part, decode_batch(f).round, decode_batch(f).round_size) for task, part, f in msgs]
    [('a', 1, 'w:1', 2), ('b', 1, 'w:1', 2)]
    """
    group_of = group_of or {}
    sizes: dict[str, int] = {}
    for batch in out.batches:
        g = group_of.get(batch.task, "")
        sizes[g] = sizes.get(g, 0) + 1
    frames = []
    for batch in out.batches:
        batch.round = round_id
        batch.round_size = sizes[group_of.get(batch.task, "")]
        frames.append((batch.task, batch.partition % partitions, encode_batch(batch)))
    return frames
