"""Replays the drifting synthetic stream: ``STREAM_MTL_SYNTHETIC_EVENTS`` events (default 60,000)."""

import os
from collections.abc import Iterator
from typing import Any

from stream_mtl.topology import load_topology_module

# the stream the topology next to this file declares (loaded by path: the repository root need not be importable)
STREAM = load_topology_module(__file__).STREAM


def events() -> Iterator[dict[str, Any]]:
    yield from STREAM.events(int(os.environ.get("STREAM_MTL_SYNTHETIC_EVENTS", "60000")))
