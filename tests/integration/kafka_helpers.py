"""Reading topics back in tests: every partition, from the beginning, no consumer group."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition


async def read_topic(
    bootstrap: str,
    topic: str,
    done: Callable[[list[Any]], bool],
    timeout: float = 120.0,
    alive: Callable[[], bool] = lambda: True,
) -> list[Any]:
    """Consume ``topic`` until ``done(records)``; raises TimeoutError, or RuntimeError once not ``alive()``."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = None
        deadline = time.monotonic() + timeout
        while not parts:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(topic)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"topic {topic} never appeared")
                await asyncio.sleep(0.2)
        consumer.assign([TopicPartition(topic, p) for p in parts])
        await consumer.seek_to_beginning()
        records: list[Any] = []
        while not done(records):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: condition not met after {len(records)} records")
            if not alive():
                raise RuntimeError(f"{topic}: the worker died after {len(records)} records")
            data = await consumer.getmany(timeout_ms=500)
            for recs in data.values():
                records.extend(recs)
        return records
    finally:
        await consumer.stop()


def expected_predictions(topology: Any, items: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(event id, task) of every prediction a stream must produce: each event for each task it is labelled for,
    and every event for a task with late labels (predicted on arrival). ``items`` may hold late-label items."""
    return {
        (ev["id"], t.name)
        for ev in items
        if "_label" not in ev
        for t in topology.tasks
        if ev.get(t.label) is not None or t.label_ttl_s is not None
    }


async def read_frames(bootstrap: str, ranges: dict[str, tuple[int, int]]) -> list[Any]:
    """The task frames (decoded) at offsets ``[start, end)`` of each "topic:partition" in ``ranges``."""
    from stream_mtl.changelog import read_ranges
    from stream_mtl.codec import decode_batch

    parts = {(k.rpartition(":")[0], int(k.rpartition(":")[2])): r for k, r in ranges.items()}
    return [decode_batch(r.value) async for records in read_ranges(bootstrap, parts, timeout=30) for r in records]


async def locate_rows(bootstrap: str, names: Any, ids: set[tuple[str, str]], group: str) -> list[str]:
    """Where the task frames holding (event id, task) ``ids`` sit, next to the group's committed offsets: says
    whether a missing prediction's frame was never written or was committed past without being processed."""
    from stream_mtl.changelog import committed_offsets
    from stream_mtl.codec import decode_batch

    out = []
    tasks = sorted({task for _, task in ids})
    for task in tasks:
        topic = names.task(task)
        want = {eid for eid, t in ids if t == task}
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in parts]
            consumer.assign(tps)
            await consumer.seek_to_beginning()
            ends = await consumer.end_offsets(tps)
            hits: list[tuple[int, int, int]] = []
            todo = {tp for tp in tps if ends[tp] > 0}
            while todo:
                data = await consumer.getmany(timeout_ms=500)
                todo = {tp for tp in todo if await consumer.position(tp) < ends[tp]}
                for tp, rs in data.items():
                    for r in rs:
                        batch = decode_batch(r.value)
                        n = sum(1 for i in batch.ids if i in want)
                        if n:
                            hits.append((tp.partition, r.offset, n))
        finally:
            await consumer.stop()
        committed = await committed_offsets(bootstrap, group, [(topic, p) for p in sorted(parts)])
        ends_by_p = {tp.partition: e for tp, e in ends.items()}
        out.append(f"{topic}: frames (partition, offset, rows) {hits}; committed {committed}; ends {ends_by_p}")
    return out

