"""Standard Webhooks signatures: what a receiver accepts and what it refuses."""

from __future__ import annotations

import base64

import pytest

from stream_mtl.alerts import Alert, ReplayGuard, WebhookVerificationError, alert_id, sign, verify

OLD = "whsec_" + base64.b64encode(b"old-secret-old-secret-old-secret").decode()
NEW = "whsec_" + base64.b64encode(b"new-secret-new-secret-new-secret").decode()
BODY = Alert(alert_id("app", "t", "adwin", "src:0@3"), "drift", "app", "t", "adwin", "w1", 1e9).to_json()
T = 1_800_000_000


def test_a_good_delivery_verifies_and_returns_the_alert() -> None:
    headers = sign("alrt_1", T, BODY, [NEW])
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert headers["webhook-signature"].startswith("v1,")
    assert verify(headers, BODY, NEW, now=T + 299)["task"] == "t"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda h, b: (h, b.replace(b'"t"', b'"x"')), "no signature matches"),  # tampered body
        (lambda h, b: ({**h, "webhook-id": "alrt_2"}, b), "no signature matches"),  # id swapped
        (lambda h, b: ({**h, "webhook-timestamp": str(T + 1)}, b), "no signature matches"),  # timestamp edited
        (lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b), "missing header"),
    ],
)
def test_tampering_is_refused(change, match: str) -> None:
    headers, body = change(sign("alrt_1", T, BODY, [NEW]), BODY)
    with pytest.raises(WebhookVerificationError, match=match):
        verify(headers, body, NEW, now=T)


def test_a_wrong_secret_is_refused() -> None:
    with pytest.raises(WebhookVerificationError, match="no signature matches"):
        verify(sign("alrt_1", T, BODY, [OLD]), BODY, NEW, now=T)


@pytest.mark.parametrize("skew", [-301, 301, 3600])
def test_timestamps_more_than_five_minutes_off_are_refused(skew: int) -> None:
    with pytest.raises(WebhookVerificationError, match="more than 300 s"):
        verify(sign("alrt_1", T, BODY, [NEW]), BODY, NEW, now=T + skew)


def test_a_replayed_id_is_refused_the_second_time() -> None:
    guard = ReplayGuard()
    headers = sign("alrt_1", T, BODY, [NEW])
    verify(headers, BODY, NEW, now=T, replay=guard)
    with pytest.raises(WebhookVerificationError, match="replayed webhook-id 'alrt_1'"):
        verify(headers, BODY, NEW, now=T + 1, replay=guard)
    verify(sign("alrt_2", T, BODY, [NEW]), BODY, NEW, now=T + 1, replay=guard)  # another id is fine


def test_key_rotation_signs_with_both_and_either_verifies() -> None:
    headers = sign("alrt_1", T, BODY, [OLD, NEW])
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert verify(headers, BODY, OLD, now=T) == verify(headers, BODY, NEW, now=T)
    assert verify(sign("alrt_1", T, BODY, [NEW]), BODY, [OLD, NEW], now=T)  # a receiver mid-rotation takes both


def test_alert_ids_are_deterministic() -> None:
    assert alert_id("app", "t", "adwin", "w") == alert_id("app", "t", "adwin", "w")
    assert alert_id("app", "t", "adwin", "w") != alert_id("app", "t", "adwin", "w2")
    assert Alert.from_json(BODY).to_json() == BODY
