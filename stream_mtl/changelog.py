"""Reading a table's changelog straight from Kafka: the latest value of each key, up to the end.

The ingest service restores the feature state of the source partitions it is assigned from the
``features`` changelog itself, instead of relying on Faust's table recovery: Faust recovers the
table partitions that go with *its* consumer group's assignment (the task topics), not with the
ingest group's source partitions, so after a rebalance across several workers the owner of a
source partition may not hold its state; and Faust stops recovering at the end offset that
ListOffsets reports, which the embedded broker under-reports (``shared/DESIGN.md`` §6). Here the
end is the *fetch* highwater, which every fetch response carries, so the tail is never missed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from stream_mtl.log import get_logger

log = get_logger(__name__)

__all__ = ["read_latest", "table_key"]


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
) -> dict[str, bytes | None]:
    """Key → latest value (``None``: deleted) over every partition of ``topic``, for keys ``keep`` accepts.

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
