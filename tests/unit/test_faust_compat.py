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
