"""Every task frame exactly where it belongs: the trainer's own check of what Faust delivers.

Faust can skip records of a partition after a rebalance and still commit past them: records fetched while
a stream's flow is paused are dropped by the stream, yet its consumer has counted them as read, and it
then counts the offsets between its committed position and the next delivered record as an acknowledged
gap (faust-streaming 0.15; the scale-out test lost frames this way in 1 run of 11). The trainer
agent therefore keeps, per task partition it owns, the offset of the next frame it must see, and plans
each batch against it (:meth:`FrameOrder.plan`):

- a frame at the expected offset is processed;
- a frame below it was processed here already (a partition kept across a rebalance is read again from
  its committed offset): it is acknowledged without being processed twice;
- a frame above it means frames were skipped: the worker reads those itself
  (:func:`stream_mtl.changelog.read_ranges`) and processes them first.

The expectation of a partition starts at its consumer group's committed offset (where Faust resumes it)
and is forgotten when the partition goes to another worker.

>>> order = FrameOrder()
>>> order.start({("t", 0): 5})
>>> order.plan([("t", 0, 5), ("t", 0, 9), ("t", 0, 3)])
([Take(index=0), Missing(topic='t', partition=0, start=6, end=9), Take(index=1)], 1)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["FrameOrder", "Missing", "Take"]


@dataclass(frozen=True)
class Take:
    """Process the batch's frame at ``index``."""

    index: int


@dataclass(frozen=True)
class Missing:
    """Read and process the frames at offsets ``[start, end)`` of a partition first (Faust skipped them)."""

    topic: str
    partition: int
    start: int
    end: int


class FrameOrder:
    """The next expected frame offset per (topic, partition) this worker's trainer owns."""

    def __init__(self) -> None:
        self.expected: dict[tuple[str, int], int] = {}
        #: frames read again that were processed here already (acknowledged, not processed twice)
        self.duplicates = 0
        #: frames Faust skipped that the worker read itself
        self.recovered = 0

    def unknown(self, positions: Iterable[tuple[str, int, int]]) -> set[tuple[str, int]]:
        """Partitions of these frames without an expectation yet (newly assigned)."""
        return {(t, p) for t, p, _ in positions if (t, p) not in self.expected}

    def start(self, offsets: dict[tuple[str, int], int]) -> None:
        """Expect these partitions' next frames at these offsets (their committed offsets, or where a replay
        ended); an expectation only moves forward."""
        for tp, offset in offsets.items():
            self.expected[tp] = max(offset, self.expected.get(tp, offset))

    def forget(self, partitions: set[tuple[str, int]]) -> None:
        """No expectation for these partitions any more (their frames were planned but not all processed)."""
        for tp in partitions:
            self.expected.pop(tp, None)

    def keep_only(self, partitions: set[tuple[str, int]]) -> None:
        """Forget the partitions not in ``partitions`` (they were revoked, or not held without a break)."""
        for tp in list(self.expected):
            if tp not in partitions:
                del self.expected[tp]

    def plan(self, positions: list[tuple[str, int, int]]) -> tuple[list[Take | Missing], int]:
        """The steps for one batch of frames (their (topic, partition, offset)s), and how many are duplicates.

        Frames of a partition without an expectation are taken as they come.
        """
        steps: list[Take | Missing] = []
        dups = 0
        expected = self.expected
        for i, (topic, partition, offset) in enumerate(positions):
            tp = (topic, partition)
            want = expected.get(tp)
            if want is not None:
                if offset < want:
                    dups += 1
                    continue
                if offset > want:
                    steps.append(Missing(topic, partition, want, offset))
                    self.recovered += offset - want
                expected[tp] = offset + 1
            steps.append(Take(i))
        self.duplicates += dups
        return steps, dups
