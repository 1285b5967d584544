"""The subscription check behind the Faust start-up race workaround."""

from __future__ import annotations

import faust

from stream_mtl.faust_compat import missing_subscriptions


async def test_a_registered_but_unsubscribed_topic_is_reported() -> None:
    app = faust.App("compat", broker="kafka://127.0.0.1:1", autodiscover=False, web_enabled=False)
    app.topics.add(app.topic("compat.a", "compat.b").clone(is_iterator=True))  # what an agent's first iteration does
    # nothing subscribed yet: both iterated topics are missing, a topic nobody iterates is not
    assert missing_subscriptions(app, ["compat.a", "compat.b", "compat.c"]) == {"compat.a", "compat.b"}
    await app.topics._update_indices()  # the Conductor's own subscription step
    assert missing_subscriptions(app, ["compat.a", "compat.b", "compat.c"]) == set()


async def test_partitions_without_a_commit_are_rewound_after_the_seek() -> None:
    from faust.types import TP

    from stream_mtl.faust_compat import seek_uncommitted_to_start

    app = faust.App("compat2", broker="kafka://127.0.0.1:1", autodiscover=False, web_enabled=False)
    committed = {TP("t", 0): None, TP("t", 1): 0, TP("t", 2): 7, TP("changelog", 0): None}
    seeks: list[tuple[TP, int]] = []

    async def seek_to_committed() -> dict:  # what Faust's driver returns: aiokafka skipped None and 0
        return committed

    async def seek(tp: TP, offset: int) -> None:
        seeks.append((tp, offset))

    app.consumer.seek_to_committed = seek_to_committed
    app.consumer.seek = seek
    seek_uncommitted_to_start(app, ["t"])
    assert await app.consumer.seek_to_committed() == committed
    # never read (None) or at 0: rewound to the start; a committed position and other topics are left alone
    assert sorted(seeks) == [(TP("t", 0), 0), (TP("t", 1), 0)]


async def test_a_record_handed_over_while_the_flow_is_stopped_does_not_count_as_read() -> None:
    from faust.types import TP

    from stream_mtl.faust_compat import guard_read_offsets

    app = faust.App("compat3", broker="kafka://127.0.0.1:1", autodiscover=False, web_enabled=False)
    guard_read_offsets(app, ["t"])
    consumer, tp, other = app.consumer, TP("t", 0), TP("changelog", 0)
    assert consumer._read_offset[tp] is None  # never read
    consumer.stop_flow()  # a rebalance: Faust has dropped the revoked partitions' read offsets
    # the fetch loop's write for the record it was handing over when the flow stopped (never delivered): had it
    # stuck, records 13 and 14 from the committed offset would be dropped once the partition came back
    consumer._read_offset[tp] = 15
    consumer._read_offset[other] = 4  # other topics (table changelogs) are Faust's own business
    assert consumer._read_offset[tp] is None and consumer._read_offset[other] == 4
    consumer._read_offset.update({tp: 13})  # perform_seek records the committed offset
    assert consumer._read_offset[tp] == 13
    consumer.resume_flow()
    consumer._read_offset[tp] = 14  # delivered records count again
    assert consumer._read_offset[tp] == 14


async def test_task_topic_gaps_are_never_acknowledged_and_records_read_aside_can_be() -> None:
    from faust.types import TP

    from stream_mtl.faust_compat import ack_offsets, no_gap_acks

    app = faust.App("compat4", broker="kafka://127.0.0.1:1", autodiscover=False, web_enabled=False)
    no_gap_acks(app, ["t"])
    consumer, tp, other = app.consumer, TP("t", 0), TP("changelog", 0)
    app.topics._acking_topics.update({"t", "changelog"})  # what subscribing the agents' topics does
    consumer._committed_offset[tp] = 13
    await consumer._add_gap(tp, 14, 16)  # Faust skipped 13–15 (never delivered) and saw 16
    await consumer._add_gap(other, 3, 5)  # a compacted changelog's gaps are real
    assert not consumer._gap[tp] and consumer._gap[other]
    consumer.ack(faust.types.Message("t", 0, 16, 0.0, 0, [], None, None, None))
    assert consumer._new_offset(tp) is None  # 13–15 unprocessed: no commit past them
    ack_offsets(app, "t", 0, [13, 14, 15])  # the trainer read and processed them itself
    assert consumer._new_offset(tp) == 17


async def test_offsets_retention_deleted_are_acknowledged_as_gone() -> None:
    from faust.types import TP

    from stream_mtl.faust_compat import ack_gone, ack_offsets, no_gap_acks

    app = faust.App("compat5", broker="kafka://127.0.0.1:1", autodiscover=False, web_enabled=False)
    no_gap_acks(app, ["t"])
    app.topics._acking_topics.add("t")
    consumer, tp = app.consumer, TP("t", 0)
    consumer._committed_offset[tp] = 13
    ack_offsets(app, "t", 0, [20])  # the log now starts at 20: 13–19 were deleted before anyone read them
    assert consumer._new_offset(tp) is None
    await ack_gone(app, "t", 0, 13, 20)
    assert consumer._new_offset(tp) == 21
