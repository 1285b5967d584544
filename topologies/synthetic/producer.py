"""Replays the synthetic stream: ``STREAM_MTL_SYNTHETIC_EVENTS`` events (default 100,000)."""

import os
from collections.abc import Iterator
from typing import Any

from stream_mtl.synthetic import SyntheticStream


def events() -> Iterator[dict[str, Any]]:
    n = int(os.environ.get("STREAM_MTL_SYNTHETIC_EVENTS", "100000"))
    yield from SyntheticStream(n_features=16, n_binary=3, n_regression=1, missing={"r0": 0.5}, seed=0).events(n)
