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
