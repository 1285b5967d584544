"""Reading state back straight from Kafka: a changelog's latest value per key, or a range of one partition.

:func:`read_latest`: the ingest service restores the feature state of the source partitions it is
assigned from the ``features`` changelog itself, instead of relying on Faust's table recovery: Faust
recovers the table partitions that go with *its* consumer group's assignment (the task topics), not
with the ingest group's source partitions, so after a rebalance across several workers the owner of a
source partition may not hold its state; and Faust stops recovering at the end offset that ListOffsets
reports, which the embedded broker under-reports (``shared/DESIGN.md`` §6). Here the end is the *fetch*
highwater, which every fetch response carries, so the tail is never missed. The trainer restores the
pending examples of the task partitions it is assigned from the ``pending`` changelog the same way (the
chunk keys lead with their task partition, and each is written to that changelog partition).

:func:`read_ranges`: a restarted trainer re-reads the task frames between its checkpoint's offsets and
where Faust resumes (see :meth:`stream_mtl.app.Pipeline.on_task_batches`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from stream_mtl.log import get_logger

log = get_logger(__name__)

__all__ = ["committed_offsets", "read_latest", "read_ranges", "table_key"]


def table_key(raw: bytes | None) -> str:
    """A Faust table key as written to its changelog (JSON-serialised: ``b'"k"'`` → ``'k'``).

    >>> table_key(b'"standardize:num:app.events:0"'), table_key(b"plain")
    ('standardize:num:app.events:0', 'plain')
    """
    if raw is None:
        return ""
    try:
        key = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace")
    return key if isinstance(key, str) else raw.decode(errors="replace")


async def read_latest(
    bootstrap: str,
    topic: str,
    keep: Callable[[str], bool] = lambda key: True,
    timeout: float = 60.0,
    partitions: Iterable[int] | None = None,
) -> dict[str, bytes | None]:
    """Key → latest value (deleted keys left out) over ``partitions`` of ``topic`` (default: all), for keys ``keep``
    accepts.

    Reads from the beginning until each partition's position reaches the highwater that the
    broker's fetch responses report. Raises ``TimeoutError`` after ``timeout`` seconds.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20)
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
        if not parts:
            return {}
        if partitions is not None:
            parts = set(parts) & set(partitions)
            if not parts:
                return {}
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        latest: dict[str, bytes | None] = {}
        records = 0
        while True:
            data = await consumer.getmany(timeout_ms=100)
            for recs in data.values():
                records += len(recs)
                for rec in recs:
                    key = table_key(rec.key)
                    if not keep(key):
                        continue
                    if rec.value is None:  # a tombstone: the key is gone (keys are not kept forever)
                        latest.pop(key, None)
                    else:
                        latest[key] = rec.value
            behind = []
            for tp in tps:
                hw = consumer.highwater(tp)
                if hw is None or await consumer.position(tp) < hw:
                    behind.append(tp)
            if not behind:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: not caught up after {timeout}s ({records} records read)")
        log.info("changelog.read", topic=topic, records=records, keys=len(latest))
        return latest
    finally:
        await consumer.stop()


async def committed_offsets(
    bootstrap: str, group: str, partitions: list[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    """The consumer group's committed offset of each (topic, partition) that has one (without joining the group)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        out = {}
        for topic, partition in partitions:
            offset = await consumer.committed(TopicPartition(topic, partition))
            if offset is not None:
                out[(topic, partition)] = offset
        return out
    finally:
        await consumer.stop()


async def read_ranges(
    bootstrap: str,
    ranges: dict[tuple[str, int], tuple[int, int]],
    chunk: int = 16,
    timeout: float = 60.0,
) -> AsyncIterator[list[Any]]:
    """The records at offsets ``[start, end)`` of each (topic, partition), one from each partition in turn.

    The order matters to a restarted trainer's replay: task frames of one ingest poll sit at about the same
    position of each task partition, so taking them round-robin replays the polls in order instead of one
    task's frames ahead of the others'. Yields lists of at most ``chunk`` records; what waits in memory is
    bounded by a fetch per partition. Raises ``TimeoutError`` when ``timeout`` seconds pass without a record.
    """
    wanted = {TopicPartition(t, p): (start, end) for (t, p), (start, end) in ranges.items() if end > start}
    if not wanted:
        return
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        consumer.assign(list(wanted))
        for tp, (start, _) in wanted.items():
            consumer.seek(tp, start)
        queues: dict[TopicPartition, deque[Any]] = {tp: deque() for tp in wanted}
        fetched: set[TopicPartition] = set()  # read up to their end
        deadline = time.monotonic() + timeout
        out: list[Any] = []
        while active := [tp for tp in wanted if queues[tp] or tp not in fetched]:
            if any(not queues[tp] for tp in active):  # a partition ran dry: fetch (the others wait, paused)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(active)} partitions not read up to their end after {timeout}s")
                full = [tp for tp in active if queues[tp] or tp in fetched]
                consumer.pause(*full)
                data = await consumer.getmany(timeout_ms=100)
                consumer.resume(*[tp for tp in full if tp not in fetched])
                if data:
                    deadline = time.monotonic() + timeout  # no progress for ``timeout`` s, not the whole read
                for tp, records in data.items():
                    queues[tp].extend(r for r in records if r.offset < wanted[tp][1])
                for tp in active:  # read to the end (or the records are gone: retention moved the start past it)
                    if tp not in fetched and await consumer.position(tp) >= wanted[tp][1]:
                        fetched.add(tp)
                        consumer.pause(tp)
                continue
            while all(queues[tp] for tp in active):  # one from each in turn, until one runs dry
                for tp in active:
                    out.append(queues[tp].popleft())
                if len(out) >= chunk:
                    yield out
                    out = []
        if out:
            yield out
    finally:
        await consumer.stop()
