"""Alerts and their signatures: the record on ``<app>.alerts`` and Standard Webhooks signing.

An :class:`Alert` has a deterministic id (task, detector, window), so the same drift seen twice
(a replay after a crash) is the same alert, and every delivery attempt carries the same
``webhook-id``. Signatures follow Standard Webhooks: ``webhook-signature`` is a space-separated
list of ``v1,<base64 HMAC-SHA256(secret, f"{id}.{timestamp}.{body}")>``, one per active secret
(several during a key rotation). Receivers call :func:`verify`.

>>> secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
>>> body = b'{"kind":"drift"}'
>>> headers = sign("msg_1", 1_700_000_000, body, [secret])
>>> verify(headers, body, secret, now=1_700_000_010)
{'kind': 'drift'}
>>> verify(headers, b'{"kind":"tampered"}', secret, now=1_700_000_010)
Traceback (most recent call last):
...
stream_mtl.alerts.WebhookVerificationError: no signature matches (tampered body or wrong secret)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

__all__ = ["Alert", "ReplayGuard", "WebhookVerificationError", "alert_id", "sign", "verify"]

#: Standard Webhooks: receivers reject timestamps further than this from their clock.
TOLERANCE_S = 300


def alert_id(*parts: object) -> str:
    """A deterministic alert id from what identifies the alert (task, detector, window …)."""
    return "alrt_" + hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:24]


@dataclass
class Alert:
    """One alert: a drift (``kind="drift"``) or an action taken on one (``kind="action"``)."""

    id: str
    kind: str
    app: str
    task: str
    detector: str
    worker: str
    ts: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, data: bytes) -> Alert:
        return cls(**orjson.loads(data))


class WebhookVerificationError(ValueError):
    """A webhook failed verification: says which check."""


def _key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (any other string is used as its UTF-8 bytes)."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_") :])
    return secret.encode()


def _signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def sign(msg_id: str, timestamp: int, body: bytes, secrets: Iterable[str]) -> dict[str, str]:
    """The three Standard Webhooks headers for one delivery (one signature per secret)."""
    sigs = " ".join(_signature(s, msg_id, timestamp, body) for s in secrets)
    if not sigs:
        raise ValueError("no signing secret")
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": sigs}


class ReplayGuard:
    """Webhook ids seen within the tolerance window (bounded): a second delivery of one id is a replay."""

    def __init__(self, max_ids: int = 100_000):
        self.max_ids = max_ids
        self._seen: OrderedDict[str, float] = OrderedDict()

    def check_and_add(self, msg_id: str, now: float) -> None:
        while self._seen and (len(self._seen) >= self.max_ids or next(iter(self._seen.values())) < now - TOLERANCE_S):
            self._seen.popitem(last=False)
        if msg_id in self._seen:
            raise WebhookVerificationError(f"replayed webhook-id {msg_id!r}")
        self._seen[msg_id] = now


def verify(
    headers: Mapping[str, str],
    body: bytes,
    secret: str | Iterable[str],
    now: float | None = None,
    replay: ReplayGuard | None = None,
) -> Any:
    """Check a webhook's signature and timestamp (and, with ``replay``, its id); return the parsed body.

    ``secret`` may be several (a receiver rotating keys accepts either). Raises
    :class:`WebhookVerificationError` naming the failed check.
    """
    h = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id, ts_raw, sigs = h["webhook-id"], h["webhook-timestamp"], h["webhook-signature"]
    except KeyError as exc:
        raise WebhookVerificationError(f"missing header {exc.args[0]!r}") from None
    try:
        ts = int(ts_raw)
    except ValueError:
        raise WebhookVerificationError(f"webhook-timestamp is not an integer: {ts_raw!r}") from None
    now = time.time() if now is None else now
    if abs(now - ts) > TOLERANCE_S:
        raise WebhookVerificationError(f"webhook-timestamp {ts} is more than {TOLERANCE_S} s from now ({int(now)})")
    secrets = [secret] if isinstance(secret, str) else list(secret)
    given = [s for s in sigs.split(" ") if s.startswith("v1,")]
    expected = [_signature(s, msg_id, ts, body) for s in secrets]
    if not any(hmac.compare_digest(g, e) for g in given for e in expected):
        raise WebhookVerificationError("no signature matches (tampered body or wrong secret)")
    if replay is not None:
        replay.check_and_add(msg_id, now)
    return orjson.loads(body)
