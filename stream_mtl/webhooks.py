"""Webhook delivery: one signed attempt, the retry policy, and which destinations are allowed.

:func:`attempt` posts one alert (Standard Webhooks headers from :mod:`stream_mtl.alerts`, the
same ``webhook-id`` on every attempt) and classifies the answer: 2xx is delivered; 410 Gone
disables the endpoint; 408, 429 and 5xx (and network errors) are retried with exponential
backoff and full jitter, never sooner than a ``Retry-After``; any other 4xx is failed and not
retried. The durable outbox that survives restarts lives in the worker (a changelogged Faust
table, see :mod:`stream_mtl.app`); this module holds no state.

Destinations on loopback, private, link-local or otherwise reserved addresses are refused unless
``allow_private`` is set (tests allow loopback): an alert must not become a request into the
worker's own network because someone edited a URL.

>>> backoff(0, rng=lambda: 1.0), backoff(3, rng=lambda: 1.0), backoff(30, rng=lambda: 1.0)
(0.5, 4.0, 300.0)
>>> backoff(0, retry_after=20.0, rng=lambda: 0.0)
20.0
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from stream_mtl.alerts import sign

__all__ = ["Delivery", "DestinationRefused", "attempt", "backoff", "check_destination", "parse_retry_after"]

BASE_S = 0.5
CAP_S = 300.0
RETRIED = frozenset({408, 429})


class DestinationRefused(ValueError):
    """The URL points at an address webhooks may not reach (see module doc)."""


@dataclass
class Delivery:
    """The outcome of one attempt: ``delivered``, ``retry``, ``failed`` or ``disabled``."""

    outcome: str
    status: int | None = None
    retry_after: float | None = None
    error: str = ""


def backoff(attempts: int, retry_after: float | None = None, rng: Callable[[], float] = random.random) -> float:
    """Seconds before the next attempt: full jitter over ``BASE_S · 2^attempts`` (capped), ≥ Retry-After."""
    ceiling = min(CAP_S, BASE_S * 2 ** min(attempts, 30))
    return max(ceiling * rng(), retry_after or 0.0)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def check_destination(url: str, allow_private: bool = False) -> None:
    """Raise :class:`DestinationRefused` unless every address ``url``'s host resolves to is public."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DestinationRefused(f"webhook URL must be http(s)://host/…, got {url!r}")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise DestinationRefused(f"webhook host {parts.hostname!r} does not resolve: {exc}") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if not ip.is_global or ip.is_multicast:
            raise DestinationRefused(
                f"webhook host {parts.hostname!r} resolves to {ip}, a non-public address "
                "(set STREAM_MTL_WEBHOOK_ALLOW_PRIVATE=1 to allow it)"
            )


async def attempt(
    client: httpx.AsyncClient,
    url: str,
    msg_id: str,
    body: bytes,
    secrets: Sequence[str],
    allow_private: bool = False,
    timeout: float = 10.0,
) -> Delivery:
    """One signed POST of ``body``; what to do next."""
    try:
        await asyncio.to_thread(check_destination, url, allow_private)
    except DestinationRefused as exc:
        return Delivery("failed", error=str(exc))
    headers = {**sign(msg_id, int(time.time()), body, secrets), "content-type": "application/json"}
    try:
        resp = await client.post(url, content=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return Delivery("retry", error=f"{type(exc).__name__}: {exc}")
    code = resp.status_code
    if 200 <= code < 300:
        return Delivery("delivered", code)
    if code == 410:
        return Delivery("disabled", code)
    if code in RETRIED or code >= 500:
        return Delivery("retry", code, parse_retry_after(resp.headers.get("retry-after")))
    return Delivery("failed", code, error=resp.text[:200])
