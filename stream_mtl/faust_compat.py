"""Workarounds for faust-streaming 0.15 behaviour the pipeline depends on, each with its reason.

Faust registers an agent's topic with the Conductor only when the agent's actor task first
iterates its stream. The Conductor's first subscription runs once agents are "started" and
tables are registered (about one second after start); if the actor has not iterated by then,
the consumer joins the group without the agent's topics. A topic added in the window between
the Conductor copying its channel set and arming its change event is never subscribed at all,
and one added later waits the Conductor's 45 s resubscribe lock. Either way a (re)started
worker can sit idle with its input unread. :func:`keep_subscribed` checks and repairs that.

After a rebalance Faust resumes the stream partitions and fetches from them *before* it seeks them to
their committed offsets, one partition at a time (~5 ms each on the embedded broker). Records fetched in
that window are lost to a partition that has no committed offset yet: aiokafka's ``seek_to_committed``
skips it (offset ``None``), so nothing rewinds it. A trainer worker started on a backlog its group had
never read (``--role trainer`` next to ingest workers) lost about half of it.
:func:`seek_uncommitted_to_start` rewinds such partitions to their start (at-least-once: what was
delivered in the window is read again, nothing is skipped). It cannot rewind a partition *below* its
committed offset: records of the batch Faust is still draining raise its read offset again, and Faust then
drops the re-fetched older records as already read. So a restarted trainer that must re-learn what its
checkpoint lacks reads those frames itself (:meth:`stream_mtl.app.Pipeline.on_task_batches`).

Faust's record of how far it has read a partition (``Consumer._read_offset``) decides which fetched records it
drops as already read and which offset gaps it counts as acknowledged. A rebalance clears it for the revoked
partitions, but the fetch loop may still be handing over a record when the flow stops (the agent's queue was
full): it then records that record's offset as read although the record was never delivered. When the
partition comes back after the rebalance, its first records (from the committed offset) fall below that stale
offset and are dropped, and the offsets between are later counted as an acknowledged gap: Faust commits past
frames nobody processed (found by the scale-out test: three frames of one partition lost when a worker rejoined a
generation late). :func:`guard_read_offsets` ignores such writes while the flow is stopped.

Records can also be skipped without a stale offset: those fetched while the app's flow control is still
paused after a rebalance are dropped by the stream after the consumer counted them as read. So for the task
topics Faust must not count gaps as acknowledged at all (:func:`no_gap_acks`): the trainer checks the
offsets it is handed (:mod:`stream_mtl.frame_order`), reads skipped frames itself and acknowledges them
(:func:`ack_offsets`), and a commit never passes a frame that was not processed.

Faust starts ``@app.service`` services and ``@app.task`` tasks only once its own tables are recovered,
after its consumer group join (the embedded broker holds every join ~1 s) and the table manager's 1 s
start-up pause. :func:`start_with_producer` starts a service right after the app's producer instead: the
ingest service joins its group while Faust joins its own (it waits for the app to be ready before its
first poll, so that the trainer reads task frames as they come), ~1 s less from worker start to first event.

Faust also hard-codes ``fetch_max_wait_ms=1500`` for its worker consumer. aiokafka keeps one
fetch in flight per broker, for the partitions that have nothing buffered; when those are idle
(a drained task topic) the broker holds that fetch for the full wait while the busy partitions'
next records queue behind it: stalls of 0.3–1.1 s at the end of every benchmark run.
:func:`set_fetch_max_wait` lowers it for one app.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import faust
from faust.types import TP, Message
from mode import Service

from stream_mtl.log import get_logger

log = get_logger(__name__)

__all__ = [
    "ack_gone",
    "ack_offsets",
    "guard_read_offsets",
    "keep_subscribed",
    "missing_subscriptions",
    "no_gap_acks",
    "seek_uncommitted_to_start",
    "set_fetch_max_wait",
    "start_with_producer",
]


def set_fetch_max_wait(app: faust.App, ms: int) -> None:
    """Make the app's worker consumer ask the broker to hold an empty fetch at most ``ms``.

    Call before the app starts: the aiokafka consumer is created when Faust's consumer thread starts.
    """
    thread = app.consumer._thread  # created with the app's consumer, started with the app
    create = thread._create_worker_consumer

    def create_with_wait(transport: object) -> object:
        consumer = create(transport)
        consumer._fetch_max_wait_ms = ms  # read when start() builds the fetcher
        return consumer

    thread._create_worker_consumer = create_with_wait


def start_with_producer(app: faust.App, make: Callable[[], Service]) -> None:
    """Start the service ``make()`` returns right after the app's producer, with the app (see the module doc).

    It is stopped with the app too, before the producer (mode stops dependencies in reverse order).
    """
    dependencies = app.on_init_dependencies

    def with_service() -> list[Service]:
        deps = list(dependencies())
        at = next((i + 1 for i, d in enumerate(deps) if d is app.producer), len(deps))
        deps.insert(at, make())
        return deps

    app.on_init_dependencies = with_service


def missing_subscriptions(app: faust.App, topics: Iterable[str]) -> set[str]:
    """Topics some channel iterates but the Conductor's last subscription did not include."""
    wanted = set(topics)
    registered = {name for channel in app.topics for name in channel.topics}
    subscribed = set(getattr(app.topics, "_topic_name_index", {}))
    return (wanted & registered) - subscribed


async def keep_subscribed(app: faust.App, topics: Iterable[str], interval: float = 0.5) -> None:
    """Resubscribe the app's consumer whenever an agent's topic was left out (see module doc).

    Runs for the life of the app; costs a set comparison per ``interval``.
    """
    topics = set(topics)
    conductor = app.topics
    await conductor.wait_for_subscriptions()
    while not app.should_stop:
        await asyncio.sleep(interval)
        if app.rebalancing:
            continue
        missing = missing_subscriptions(app, topics)
        if missing:
            log.warning("faust.resubscribe", missing=sorted(missing))
            # the two calls the Conductor's own subscriber makes
            await app.consumer.subscribe(await conductor._update_indices())


def seek_uncommitted_to_start(app: faust.App, topics: Iterable[str]) -> None:
    """Make the app's post-rebalance "seek to committed" rewind partitions of ``topics`` with no commit yet.

    Call before the app starts (see the module doc).
    """
    topics = frozenset(topics)
    consumer = app.consumer
    seek_to_committed = consumer.seek_to_committed

    async def seek_with_start() -> dict:
        committed = await seek_to_committed()
        fresh = [tp for tp, offset in committed.items() if not offset and tp.topic in topics]
        for tp in fresh:
            await consumer.seek(tp, 0)
        if fresh:
            log.info("faust.seek_uncommitted", partitions=len(fresh))
        return committed

    consumer.seek_to_committed = seek_with_start


class _FlowGuardedOffsets(dict):
    """``Consumer._read_offset`` that ignores writes for ``topics`` while the consumer's flow is stopped.

    ``None`` for a partition not read yet (Faust's ``defaultdict`` default). ``dict.update`` (how Faust's
    ``perform_seek`` records the committed offsets) is not guarded.
    """

    def __init__(self, consumer: object, topics: frozenset[str]):
        super().__init__()
        self._consumer = consumer
        self._topics = topics

    def __missing__(self, tp: object) -> None:
        return None

    def __setitem__(self, tp: object, offset: int | None) -> None:
        if getattr(self._consumer, "flow_active", True) or getattr(tp, "topic", None) not in self._topics:
            super().__setitem__(tp, offset)


def guard_read_offsets(app: faust.App, topics: Iterable[str]) -> None:
    """Keep the app's read offsets of ``topics`` to records actually delivered (see the module doc).

    Call before the app starts.
    """
    consumer = app.consumer
    guarded = _FlowGuardedOffsets(consumer, frozenset(topics))
    guarded.update(consumer._read_offset)
    consumer._read_offset = guarded


def no_gap_acks(app: faust.App, topics: Iterable[str]) -> None:
    """Never count offset gaps of ``topics`` as acknowledged (see the module doc); other topics keep Faust's rule.

    Call before the app starts. The task topics are neither compacted nor transactional: their offsets have
    no gaps of their own.
    """
    topics = frozenset(topics)
    consumer = app.consumer
    add_gap = consumer._add_gap

    async def add_gap_elsewhere(tp: TP, offset_from: int, offset_to: int) -> None:
        if tp.topic not in topics:
            await add_gap(tp, offset_from, offset_to)

    consumer._add_gap = add_gap_elsewhere
    consumer._faust_add_gap = add_gap  # for offsets known to be gone (ack_gone)


async def ack_gone(app: faust.App, topic: str, partition: int, start: int, end: int) -> None:
    """Count offsets ``[start, end)`` that hold no record any more (retention deleted them) as acknowledged:
    Faust's own gap, so a commit may pass them."""
    consumer = app.consumer
    add_gap = getattr(consumer, "_faust_add_gap", consumer._add_gap)
    if start < end:
        await add_gap(TP(topic, partition), start, end - 1)


def ack_offsets(app: faust.App, topic: str, partition: int, offsets: Iterable[int]) -> None:
    """Acknowledge records the worker processed without Faust delivering them (read by the trainer itself)."""
    consumer = app.consumer
    for offset in offsets:
        consumer.ack(Message(topic, partition, offset, 0.0, 0, [], None, None, None))
