"""The webhook outbox: every alert waits here, per endpoint, until a receiver took it.

The worker writes an entry (alert id, body, attempts, next attempt time) to a changelogged Faust
table when it publishes the alert on ``<app>.alerts``, and a timer delivers what is due with
:func:`stream_mtl.webhooks.attempt`. So an alert survives the receiver being down (it is retried
with backoff, the same ``webhook-id`` every time) and the worker restarting (the table comes
back from its changelog). An endpoint that answers 410 is disabled (that is kept in the table
too); an alert an endpoint refuses for good (another 4xx, a refused address) is dropped. Both
are recorded through ``record`` (the worker puts them on ``<app>.alerts``). The outbox is bounded:
``MAX_ENTRIES`` waiting entries, ``MAX_ATTEMPTS`` attempts each (then recorded as failed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import httpx
import orjson

from stream_mtl.log import get_logger
from stream_mtl.webhooks import attempt, backoff

log = get_logger(__name__)

__all__ = ["WebhookOutbox"]

#: Entries attempted at once per delivery round (a slow endpoint does not hold back the others).
MAX_IN_FLIGHT = 16
#: Bounds: an entry is given up (and recorded) after this many attempts — with the 300 s backoff cap about
#: a day of retrying — and no more than this many entries wait; the alert itself stays on ``<app>.alerts``.
MAX_ATTEMPTS = 300
MAX_ENTRIES = 10_000


class WebhookOutbox:
    """Undelivered alerts by ``<url>|<alert id>`` in ``table`` (bytes values); see module doc."""

    def __init__(
        self,
        table: MutableMapping[str, bytes],
        urls: Sequence[str],
        secrets: Sequence[str],
        record: Callable[[dict[str, Any]], Awaitable[None]],
        allow_private: bool = False,
        clock: Callable[[], float] = time.time,
    ):
        self.table, self.urls, self.secrets = table, list(urls), list(secrets)
        self.record, self.allow_private, self.clock = record, allow_private, clock
        self.delivered = 0
        self.attempts = 0
        self.given_up = 0

    def _drop(self, key: str) -> None:
        if key in self.table:  # a Faust table with a default answers a missing key instead of raising
            del self.table[key]

    def disabled(self, url: str) -> bool:
        return f"disabled|{url}" in self.table

    def add(self, alert_id: str, body: bytes) -> int:
        """Queue one alert for every enabled endpoint (idempotent by alert id); entries added."""
        added = 0
        full = self.pending() >= MAX_ENTRIES
        for url in self.urls:
            key = f"{url}|{alert_id}"
            if self.disabled(url) or key in self.table:
                continue
            if full:  # bounded: this alert is not queued for delivery (it is still on <app>.alerts)
                self.given_up += 1
                log.warning("webhook.outbox_full", url=url, alert=alert_id, entries=MAX_ENTRIES)
                continue
            entry = {"url": url, "id": alert_id, "body": body.decode(), "attempts": 0, "next_at": 0.0}
            self.table[key] = orjson.dumps(entry)
            added += 1
        return added

    def pending(self) -> int:
        return sum(1 for k in self.table if not k.startswith("disabled|"))

    async def deliver_due(self, client: httpx.AsyncClient) -> int:
        """Attempt every entry that is due; the number delivered."""
        now = self.clock()
        due = []
        for key, raw in list(self.table.items()):
            if key.startswith("disabled|") or raw is None:
                continue
            entry = orjson.loads(raw)
            if entry["next_at"] <= now:
                due.append((key, entry))
        done = 0
        for i in range(0, len(due), MAX_IN_FLIGHT):
            chunk = due[i : i + MAX_IN_FLIGHT]
            results = await asyncio.gather(*(self._one(client, key, entry) for key, entry in chunk))
            done += sum(results)
        return done

    async def _one(self, client: httpx.AsyncClient, key: str, entry: dict[str, Any]) -> bool:
        url, alert_id = entry["url"], entry["id"]
        if self.disabled(url):
            self._drop(key)
            return False
        res = await attempt(client, url, alert_id, entry["body"].encode(), self.secrets, self.allow_private)
        self.attempts += 1
        if res.outcome == "delivered":
            self._drop(key)
            self.delivered += 1
            log.info("webhook.delivered", url=url, alert=alert_id, attempts=entry["attempts"] + 1)
            return True
        if res.outcome == "retry" and entry["attempts"] + 1 >= MAX_ATTEMPTS:
            res.outcome, res.error = "failed", f"gave up after {MAX_ATTEMPTS} attempts ({res.status or res.error})"
            self.given_up += 1
        if res.outcome == "retry":
            entry["attempts"] += 1
            entry["next_at"] = self.clock() + backoff(entry["attempts"], res.retry_after)
            entry["last"] = res.status or res.error
            self.table[key] = orjson.dumps(entry)
            return False
        self._drop(key)
        if res.outcome == "disabled":
            self.table[f"disabled|{url}"] = orjson.dumps({"status": res.status, "ts": self.clock()})
            for other in [k for k in self.table if k.startswith(f"{url}|")]:
                self._drop(other)
            log.warning("webhook.endpoint_disabled", url=url, status=res.status)
        else:
            log.warning("webhook.refused", url=url, alert=alert_id, status=res.status, reason=res.error[:120])
        await self.record(
            {"outcome": res.outcome, "url": url, "alert": alert_id, "status": res.status, "error": res.error[:200]}
        )
        return False
