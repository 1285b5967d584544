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

:func:`read_range`: a restarted trainer re-reads the task frames between its checkpoint's offsets and
where Faust resumes (see :meth:`stream_mtl.app.Pipeline.on_task_batches`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from stream_mtl.log import get_logger

log = get_logger(__name__)

__all__ = ["read_latest", "read_range", "table_key"]


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
    """Key → latest value (``None``: deleted) over ``partitions`` of ``topic`` (default: all), for keys ``keep``
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
                    if keep(key):
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


async def read_range(
    bootstrap: str, topic: str, partition: int, start: int, end: int, timeout: float = 60.0
) -> AsyncIterator[list[Any]]:
    """The records at offsets ``[start, end)`` of one partition, in order, a fetch at a time (bounded memory).

    Raises ``TimeoutError`` if they are not all read within ``timeout`` seconds.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        deadline = time.monotonic() + timeout
        while await consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}:{partition}: offsets {start}..{end} not read after {timeout}s")
            data = await consumer.getmany(tp, timeout_ms=100, max_records=64)
            records = [r for r in data.get(tp, ()) if r.offset < end]
            if records:
                yield records
    finally:
        await consumer.stop()
