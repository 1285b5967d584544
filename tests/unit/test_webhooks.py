"""Webhook delivery against a real HTTP server on loopback: retries, 410, 4xx, the outbox, refused addresses."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from aiohttp import web

from stream_mtl.alerts import sign, verify
from stream_mtl.outbox import WebhookOutbox
from stream_mtl.receiver import make_receiver
from stream_mtl.webhooks import DestinationRefused, attempt, backoff, check_destination, parse_retry_after

SECRET = "whsec_" + base64.b64encode(b"unit-test-secret-unit-test-secret").decode()


class Flaky:
    """Answers the ``script`` statuses first, then verifies and accepts."""

    def __init__(self, script: list[int], retry_after: str | None = None):
        self.script, self.retry_after = list(script), retry_after
        self.ids: list[str] = []  # webhook-id of every request, in order
        self.accepted: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.ids.append(request.headers["webhook-id"])
        if self.script:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.Response(status=self.script.pop(0), headers=headers)
        body = await request.read()
        verify(request.headers, body, SECRET)
        self.accepted.append(request.headers["webhook-id"])
        return web.json_response({"ok": True})


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, dict[str, Flaky]]]:
    box: dict[str, Flaky] = {}

    async def handle(request: web.Request) -> web.StreamResponse:
        return await box["flaky"].handle(request)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/hook", box
    await runner.cleanup()


def recorder() -> tuple[list[dict], Callable[[dict], Awaitable[None]]]:
    """What the outbox records (refusals, disabled endpoints), and the callback that records it."""
    records: list[dict] = []

    async def record(e: dict) -> None:
        records.append(e)

    return records, record


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def _drain(outbox: WebhookOutbox, clock: Clock, rounds: int = 10) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(rounds):
            await outbox.deliver_due(client)
            clock.now += 400  # past any backoff (capped at 300 s)


async def test_503s_are_retried_and_the_alert_arrives_once_with_one_webhook_id(server) -> None:
    url, box = server
    box["flaky"] = flaky = Flaky([503, 503, 429], retry_after="0")
    records, record = recorder()
    clock = Clock()

    table: dict[str, bytes] = {}
    outbox = WebhookOutbox(table, [url], [SECRET], record, allow_private=True, clock=clock)
    assert outbox.add("alrt_x", b'{"id":"alrt_x"}') == 1
    assert outbox.add("alrt_x", b'{"id":"alrt_x"}') == 0  # idempotent by alert id
    await _drain(outbox, clock)
    assert flaky.ids == ["alrt_x"] * 4  # three refusals, then the delivery: the same id every time
    assert flaky.accepted == ["alrt_x"] and outbox.delivered == 1 and outbox.pending() == 0
    assert records == []


async def test_410_disables_the_endpoint_and_is_recorded(server) -> None:
    url, box = server
    box["flaky"] = flaky = Flaky([410])
    records, record = recorder()
    clock = Clock()
    outbox = WebhookOutbox({}, [url], [SECRET], record, allow_private=True, clock=clock)
    outbox.add("a1", b"{}")
    await _drain(outbox, clock, rounds=3)
    assert flaky.ids == ["a1"] and outbox.disabled(url)
    assert outbox.add("a2", b"{}") == 0  # nothing more is queued for it
    assert records == [{"outcome": "disabled", "url": url, "alert": "a1", "status": 410, "error": ""}]


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_other_4xx_are_not_retried_and_are_recorded(server, status: int) -> None:
    url, box = server
    box["flaky"] = flaky = Flaky([status, 200])
    records, record = recorder()
    clock = Clock()
    outbox = WebhookOutbox({}, [url], [SECRET], record, allow_private=True, clock=clock)
    outbox.add("a1", b"{}")
    await _drain(outbox, clock, rounds=3)
    assert flaky.ids == ["a1"] and outbox.pending() == 0
    assert records[0]["outcome"] == "failed" and records[0]["status"] == status


async def test_the_outbox_survives_a_restart_of_its_worker(server) -> None:
    """The table is what a restarted worker recovers from its changelog: a new outbox on it delivers."""
    url, box = server
    box["flaky"] = flaky = Flaky([503])
    table: dict[str, bytes] = {}
    clock = Clock()

    async def record(e: dict) -> None:
        raise AssertionError(e)

    first = WebhookOutbox(table, [url], [SECRET], record, allow_private=True, clock=clock)
    first.add("a1", b'{"n":1}')
    async with httpx.AsyncClient() as client:
        await first.deliver_due(client)  # 503: still owed
    assert flaky.accepted == [] and len(table) == 1
    clock.now += 400
    second = WebhookOutbox(table, [url], [SECRET], record, allow_private=True, clock=clock)  # "after the restart"
    await _drain(second, clock, rounds=2)
    assert flaky.accepted == ["a1"] and flaky.ids == ["a1", "a1"] and table == {}


async def test_a_receiver_that_is_down_means_retry() -> None:
    async with httpx.AsyncClient() as client:
        res = await attempt(client, "http://127.0.0.1:1/hook", "a1", b"{}", [SECRET], allow_private=True, timeout=2)
    assert res.outcome == "retry" and "ConnectError" in res.error


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/x", "http://10.1.2.3/x", "http://169.254.169.254/latest", "http://[::1]/"]
)
def test_non_public_destinations_are_refused_unless_allowed(url: str) -> None:
    with pytest.raises(DestinationRefused, match="non-public address"):
        check_destination(url)
    check_destination(url, allow_private=True)


def test_a_public_address_and_bad_urls() -> None:
    check_destination("https://8.8.8.8/hook")
    with pytest.raises(DestinationRefused, match="http"):
        check_destination("ftp://example.com/x")


def test_backoff_grows_with_full_jitter_and_honours_retry_after() -> None:
    assert [backoff(a, rng=lambda: 1.0) for a in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff(100, rng=lambda: 1.0) == 300.0
    assert 0 <= backoff(5) <= 16
    assert backoff(0, retry_after=30, rng=lambda: 0.5) == 30
    assert parse_retry_after("120") == 120 and parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 60) == pytest.approx(60)


async def test_the_receiver_accepts_signed_alerts_once_and_refuses_the_rest() -> None:
    got: list[str] = []
    runner = web.AppRunner(make_receiver([SECRET], lambda wid, _body: got.append(wid)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/"  # type: ignore[union-attr]
    import time

    body = b'{"id":"a1"}'
    good = sign("a1", int(time.time()), body, [SECRET])
    try:
        async with httpx.AsyncClient() as client:
            assert (await client.post(url, content=body, headers=good)).status_code == 200
            assert (await client.post(url, content=body, headers=good)).status_code == 409  # replay
            assert (await client.post(url, content=b'{"id":"a2"}', headers=good)).status_code == 401  # tampered
            old = sign("a3", int(time.time()) - 600, body, [SECRET])
            assert (await client.post(url, content=body, headers=old)).status_code == 401
    finally:
        await runner.cleanup()
    assert got == ["a1"]


async def test_the_outbox_is_bounded_in_entries_and_attempts(server, monkeypatch) -> None:
    import stream_mtl.outbox as outbox_module

    url, box = server
    box["flaky"] = Flaky([503] * 10)
    monkeypatch.setattr(outbox_module, "MAX_ENTRIES", 3)
    monkeypatch.setattr(outbox_module, "MAX_ATTEMPTS", 2)
    records, record = recorder()
    clock = Clock()
    outbox = WebhookOutbox({}, [url], [SECRET], record, allow_private=True, clock=clock)
    assert [outbox.add(f"a{i}", b"{}") for i in range(5)] == [1, 1, 1, 0, 0]  # full at 3
    await _drain(outbox, clock, rounds=4)
    assert outbox.pending() == 0 and outbox.given_up == 5
    assert {r["alert"] for r in records} == {"a0", "a1", "a2"} and "gave up after 2 attempts" in records[0]["error"]
