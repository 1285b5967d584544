"""The ingest half of the pipeline as plain functions: decode → validate → features → route.

:class:`IngestStage` holds the shared feature state (one running standardiser per source
partition, so a partition's owner is the only writer) and per-stage timings. The Faust
ingest service calls :meth:`IngestStage.process` on each polled batch; tests and the
benchmark call the same method.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_mtl.codec import TaskBatch
from stream_mtl.features import RunningStandardizer
from stream_mtl.ingest import DeadLetter, EventValidator, SourceRecord, ingest_records
from stream_mtl.routing import route
from stream_mtl.topology import Topology

__all__ = ["IngestOutput", "IngestStage", "feature_key"]


def feature_key(topic: str, partition: int) -> str:
    """Feature-table key of the standardiser owned by one source partition."""
    return f"standardize:{topic}:{partition}"


@dataclass
class IngestOutput:
    """What one polled batch turns into."""

    batches: list[TaskBatch] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    table_updates: dict[str, dict[str, Any]] = field(default_factory=dict)  # coalesced per key
    valid: int = 0


class IngestStage:
    """Decode, validate, featurise and route batches of source records."""

    def __init__(self, topology: Topology):
        self.topology = topology
        self.validator = EventValidator(topology)
        self.feature_version = topology.feature_version()
        self.standardizers: dict[str, RunningStandardizer] = {}
        self.timings = {"decode_validate": 0.0, "features": 0.0, "route": 0.0}
        self.records = 0
        self.valid = 0
        self.dead = 0

    def load_state(self, key: str, state: dict[str, Any] | None) -> None:
        """Restore one partition's feature state (from the feature table)."""
        if state is not None and len(state.get("mean", [])) == self.topology.input_dim:
            self.standardizers[key] = RunningStandardizer.from_state(state)

    def _standardizer(self, key: str) -> RunningStandardizer:
        s = self.standardizers.get(key)
        if s is None:
            s = self.standardizers[key] = RunningStandardizer(self.topology.input_dim)
        return s

    def process(self, records: Iterable[SourceRecord]) -> IngestOutput:
        """One polled batch (any mix of partitions) → task batches, dead letters, table updates."""
        t0 = time.perf_counter()
        recs = list(records)
        res = ingest_records(recs, self.validator)
        t1 = time.perf_counter()
        out = IngestOutput(dead=res.dead, valid=len(res.events))
        # group by source partition: each partition has its own feature state
        groups: dict[tuple[str, int], tuple[list[dict[str, Any]], list[int], list[tuple[Any, ...]]]] = {}
        for ev, (topic, partition, offset), vals in zip(res.events, res.positions, res.values, strict=True):
            g = groups.get((topic, partition))
            if g is None:
                g = groups[(topic, partition)] = ([], [], [])
            g[0].append(ev)
            g[1].append(offset)
            g[2].append(vals)
        featurised = []
        for (topic, partition), (events, offsets, values) in groups.items():
            key = feature_key(topic, partition)
            std = self._standardizer(key)
            x = std.update_transform(np.array(values, dtype=np.float64))
            out.table_updates[key] = std.state()
            featurised.append((events, offsets, x, f"{topic}:{partition}"))
        t2 = time.perf_counter()
        for events, offsets, x, source in featurised:
            out.batches.extend(route(events, offsets, x, self.topology, source, self.feature_version))
        t3 = time.perf_counter()
        self.timings["decode_validate"] += t1 - t0
        self.timings["features"] += t2 - t1
        self.timings["route"] += t3 - t2
        self.records += len(recs)
        self.valid += out.valid
        self.dead += len(out.dead)
        return out
