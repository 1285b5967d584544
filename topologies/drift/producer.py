"""Replays the drifting synthetic stream: ``STREAM_MTL_SYNTHETIC_EVENTS`` events (default 60,000)."""

import os
from collections.abc import Iterator
from typing import Any

from topologies.drift.topology import STREAM


def events() -> Iterator[dict[str, Any]]:
    yield from STREAM.events(int(os.environ.get("STREAM_MTL_SYNTHETIC_EVENTS", "60000")))
