"""Replay a data set onto the source topics as single-event JSON messages (orjson).

Optionally mixes in malformed records (bad JSON, wrong types, missing fields) so the
dead-letter path is exercised; their keys start with ``malformed-``.

A replayed item is an event dict; in a topology with several sources it names its source
in ``"_source"`` (default: the first). An item ``{"_label": {"id", "task", "value", …}}`` is
a late label and goes to ``<app>.labels``, keyed by the event id like its event.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from stream_mtl.topics import TopicNames
from stream_mtl.topology import Topology

__all__ = ["ProduceReport", "malformed_payloads", "produce_events"]


@dataclass
class ProduceReport:
    """What was sent: valid events, malformed records, labelled examples per task."""

    events: int = 0
    malformed: int = 0
    labelled: dict[str, int] = field(default_factory=dict)
    malformed_keys: list[bytes] = field(default_factory=list)
    labels: int = 0  # late label messages


def malformed_payloads(topology: Topology, n: int, seed: int = 0) -> list[bytes]:
    """``n`` records that must fail ingest, cycling through the kinds of badness."""
    rng = random.Random(seed)
    numeric = [f for spec in topology.features if spec.kind in ("standardize", "entity") for f in spec.inputs]
    feat = numeric[0] if numeric else topology.features[0].inputs[0]
    id_field = topology.schema.id_field
    kinds = [
        lambda i: b'{"id": "broken-' + str(i).encode() + b'", ',  # truncated JSON
        lambda i: orjson.dumps({id_field: f"bad-{i}", feat: "not-a-number"}),  # wrong type
        lambda i: orjson.dumps({id_field: f"bad-{i}"}),  # missing feature
        lambda i: orjson.dumps([1, 2, 3]),  # not an object
        lambda i: b"\xff\xfe garbage",  # not UTF-8
    ]
    return [kinds[i % len(kinds)](i) if i < len(kinds) else rng.choice(kinds)(i) for i in range(n)]


async def produce_events(
    bootstrap: str,
    names: TopicNames,
    events: Iterable[dict[str, Any]],
    malformed: int = 0,
    seed: int = 0,
    limit: int | None = None,
) -> ProduceReport:
    """Send every event (key = event id) and ``malformed`` bad records spread among them.

    ``limit`` counts events (late labels ride along with the events they follow).
    """
    topology = names.topology
    from aiokafka import AIOKafkaProducer

    report = ProduceReport(labelled={t.name: 0 for t in topology.tasks})
    evs = _take(events, limit)
    topic = names.source
    bad = malformed_payloads(topology, malformed, seed)
    rng = random.Random(seed)
    slots = sorted(rng.sample(range(len(evs) + len(bad)), len(bad))) if bad else []
    id_field = topology.schema.id_field
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    try:
        futures = []
        ev_iter = iter(evs)
        bad_iter = iter(bad)
        slot_set = set(slots)
        for pos in range(len(evs) + len(bad)):
            if pos in slot_set:
                key = f"malformed-{report.malformed}".encode()
                futures.append(await producer.send(topic, next(bad_iter), key=key))
                report.malformed += 1
                report.malformed_keys.append(key)
                continue
            ev = next(ev_iter)
            label = ev.get("_label")
            if label is not None:
                futures.append(await producer.send(names.labels, orjson.dumps(label), key=str(label["id"]).encode()))
                report.labels += 1
                continue
            src = ev.pop("_source", None)
            for t in topology.tasks:
                if ev.get(t.label) is not None:
                    report.labelled[t.name] += 1
            dest = topic if src is None else names.source_topic(src)
            futures.append(await producer.send(dest, orjson.dumps(ev), key=str(ev[id_field]).encode()))
            report.events += 1
        await producer.flush()
        for f in futures:
            await f
    finally:
        await producer.stop()
    return report


def _take(events: Iterable[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """The first ``limit`` events (all when ``None``), with the late labels among them."""
    out: list[dict[str, Any]] = []
    n = 0
    for ev in events:
        if limit is not None and n >= limit and "_label" not in ev:
            break
        out.append(dict(ev))
        n += "_label" not in ev
    return out
