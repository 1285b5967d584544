"""Replays a generated shop stream: reviews and clicks interleaved, purchase labels arriving late.

``events(n)`` yields ``n`` events (40% reviews, 60% clicks) plus late-label items: each click's
``bought`` and ``spend`` labels follow 40 clicks later; 5% never arrive (they expire unlabelled),
and a few labels name events that never existed (they go to ``shop.labels.expired``).
``STREAM_MTL_SHOP_EVENTS`` sets the default length.
"""

from __future__ import annotations

import os
import random
from collections import deque
from collections.abc import Iterator
from typing import Any

POSITIVE = ["good", "fast", "friendly", "tasty", "fresh", "helpful"]
NEGATIVE = ["bad", "slow", "rude", "cold", "stale", "broken"]
FILLER = ["the", "order", "was", "and", "delivery", "item", "staff", "really", "quite", "box", "price", "it"]
PAGES = [f"/p/{i}" for i in range(12)]
LABEL_DELAY = 40  # clicks between a click and its purchase labels
UNKNOWN_LABELS = 5


def events(n: int | None = None, seed: int = 0) -> Iterator[dict[str, Any]]:
    n = n if n is not None else int(os.environ.get("STREAM_MTL_SHOP_EVENTS", "6000"))
    rng = random.Random(seed)
    spender = {f"u{i}": rng.random() for i in range(200)}
    hot_pages = set(rng.sample(PAGES, 3))
    waiting: deque[list[dict[str, Any]]] = deque()
    for i in range(n):
        if i % 500 == 499 and i // 500 < UNKNOWN_LABELS:
            yield {"_label": {"id": f"ghost-{i}", "task": "bought", "value": True}}
        if rng.random() < 0.4:
            yield _review(i, rng)
            continue
        user = rng.choice(list(spender))
        page = rng.choice(PAGES)
        dwell = round(rng.expovariate(1 / 20), 3)
        p = 0.02 + 0.5 * spender[user] * (page in hot_pages) + 0.1 * (dwell > 40)
        bought = rng.random() < p
        spend = round(10 + 90 * spender[user] + rng.gauss(0, 5), 2) if bought else 0.0
        eid = f"click-{i}"
        yield {"_source": "clicks", "id": eid, "user": user, "page": page, "dwell": dwell}
        if rng.random() >= 0.05:
            waiting.append(
                [
                    {"_label": {"id": eid, "task": "bought", "value": bought, "meta": {"source": "orders"}}},
                    {"_label": {"id": eid, "task": "spend", "value": spend, "meta": {"source": "orders"}}},
                ]
            )
        if len(waiting) > LABEL_DELAY:
            yield from waiting.popleft()
    while waiting:
        yield from waiting.popleft()


def _review(i: int, rng: random.Random) -> dict[str, Any]:
    positive = rng.random() < 0.6
    words = [rng.choice(POSITIVE if (rng.random() < 0.8) == positive else NEGATIVE) for _ in range(rng.randint(1, 3))]
    words += [rng.choice(FILLER) for _ in range(rng.randint(2, 12))]
    rng.shuffle(words)
    stars = float(min(5, max(1, round(rng.gauss(4.2 if positive else 1.8, 0.8)))))
    ev: dict[str, Any] = {
        "_source": "reviews",
        "id": f"review-{i}",
        "body": " ".join(words),
        "stars": stars,
        "positive": positive,
    }
    if len(words) > 8:
        ev["helpful"] = rng.random() < (0.7 if len(set(words) & set(POSITIVE + NEGATIVE)) > 1 else 0.2)
    return ev
