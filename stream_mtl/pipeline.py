"""The ingest half of the pipeline as plain functions: decode → validate → features → route.

:class:`IngestStage` holds the shared feature state (one running standardiser per source
partition, so a partition's owner is the only writer) and per-stage timings. The Faust
ingest service calls :meth:`IngestStage.process` on each polled batch; tests and the
benchmark call the same method.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
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

    def process(self, partitions: Mapping[Any, list[SourceRecord]]) -> IngestOutput:
        """One poll (records grouped by source partition) → task batches, dead letters, table updates."""
        out = IngestOutput()
        for recs in partitions.values():
            if recs:
                self._process_partition(recs, out)
        return out

    def _process_partition(self, recs: list[SourceRecord], out: IngestOutput) -> None:
        t0 = time.perf_counter()
        res = ingest_records(recs, self.validator)
        t1 = time.perf_counter()
        out.dead.extend(res.dead)
        out.valid += len(res.events)
        self.records += len(recs)
        self.valid += len(res.events)
        self.dead += len(res.dead)
        if res.events:
            topic, partition = recs[0].topic, recs[0].partition
            key = feature_key(topic, partition)
            std = self._standardizer(key)
            x = std.update_transform(np.array(res.values, dtype=np.float64))
            out.table_updates[key] = std.state()
            t2 = time.perf_counter()
            out.batches.extend(
                route(
                    res.events, res.offsets, x, self.topology, f"{topic}:{partition}", self.feature_version, res.columns
                )
            )
            self.timings["features"] += t2 - t1
            self.timings["route"] += time.perf_counter() - t2
        self.timings["decode_validate"] += t1 - t0
