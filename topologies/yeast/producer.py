"""Replays river's bundled Yeast data set as JSON events, in its original order."""

from collections.abc import Iterator
from typing import Any


def events() -> Iterator[dict[str, Any]]:
    """One event per gene: ``id``, ``Att1`` … ``Att103`` and the 14 ``ClassN`` labels."""
    from river import datasets

    for i, (x, y) in enumerate(datasets.Yeast()):
        yield {"id": f"yeast-{i}", **x, **{k: bool(v) for k, v in y.items()}}
