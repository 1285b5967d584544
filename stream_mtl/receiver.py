"""A webhook receiver that verifies what stream_mtl sends: ``stream-mtl webhook-receiver``.

Each POST is checked with :func:`stream_mtl.alerts.verify` (signature over id, timestamp and
body with any of the secrets, timestamp within 5 minutes, ``webhook-id`` not seen before);
a good one is answered 200 and handed to ``on_alert``; a bad signature or timestamp gets 401,
a replayed id 409 (the sender records it and does not retry). Users run it to see their alerts,
and tests run it as the far end of the delivery path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from stream_mtl.alerts import ReplayGuard, WebhookVerificationError, verify

__all__ = ["COUNTS", "make_receiver"]

#: accepted / rejected deliveries, on the app
COUNTS = web.AppKey("counts", dict)


def make_receiver(secrets: Sequence[str], on_alert: Callable[[str, Any], None]) -> web.Application:
    """An aiohttp app that verifies webhooks and calls ``on_alert(webhook_id, body)`` for each good one."""
    guard = ReplayGuard()
    counts = {"accepted": 0, "rejected": 0}

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            payload = verify(request.headers, body, list(secrets), replay=guard)
        except WebhookVerificationError as exc:
            counts["rejected"] += 1
            status = 409 if "replayed" in str(exc) else 401
            return web.json_response({"error": str(exc)}, status=status)
        counts["accepted"] += 1
        on_alert(request.headers["webhook-id"], payload)
        return web.json_response({"ok": True})

    app = web.Application()
    app[COUNTS] = counts
    app.router.add_post("/{tail:.*}", handle)
    return app
