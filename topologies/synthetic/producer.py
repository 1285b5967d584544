"""Replays the synthetic stream: ``STREAM_MTL_SYNTHETIC_EVENTS`` events (default 100,000), late labels included."""

import os
from collections.abc import Iterator
from typing import Any

from stream_mtl.synthetic import SyntheticStream


def events() -> Iterator[dict[str, Any]]:
    n = int(os.environ.get("STREAM_MTL_SYNTHETIC_EVENTS", "100000"))
    yield from SyntheticStream.default().events(n)
