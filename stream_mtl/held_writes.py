"""Pending-label writes held back until a checkpoint covers the frames that made them.

A worker that crashes resumes from its newest checkpoint and replays the task frames the checkpoint
had not learned (``task_offsets``, :meth:`stream_mtl.app.Pipeline._replay_missed`). Its pending-label
store comes back from the ``pending`` changelog, which is written as frames are processed. Had the
join marks of labels read after the checkpoint been written, the replayed labels would find their rows
already joined (counted as duplicates) and what they taught the lost model would not be learned again.

So the writes that *close* rows (join marks, retired chunks) are held, tagged with the frame that made
them, and released once a checkpoint has learned past that frame; the writes that *add* rows go out at
once (a replayed example frame finds its rows waiting and keeps their first prediction). When a worker
hands its partitions over (a rebalance, a clean stop) everything held is written: the next owner does
not replay this worker's frames.

>>> held = HeldWrites()
>>> held.hold("t.y:0", 7, {"0:y:1.0:1": b"frame", "0:y:1.0:1:joined": b"[0]"})
{'0:y:1.0:1': b'frame'}
>>> held.release({"t.y:0": 7}), held.release({"t.y:0": 8})   # learned up to offset 8: frame 7 is in the weights
({}, {'0:y:1.0:1:joined': b'[0]'})
"""

from __future__ import annotations

from collections import deque

from stream_mtl.log import get_logger

log = get_logger(__name__)

__all__ = ["HeldWrites"]

#: Frames whose closing writes are held at most (beyond it the oldest are released early: a crash could then
#: count a few replayed labels as duplicates instead of learning them again).
MAX_HELD_FRAMES = 4096


def _adds_row(key: str, value: bytes | None) -> bool:
    """A chunk frame written (rows added), not a join mark or a delete."""
    return value is not None and not key.endswith(":joined")


class HeldWrites:
    """Closing writes of the pending store per frame ("topic:partition", offset), in the order they were made."""

    def __init__(self, max_frames: int = MAX_HELD_FRAMES):
        self.max_frames = max_frames
        self._held: deque[tuple[str, int, dict[str, bytes | None]]] = deque()
        #: frames released before a checkpoint covered them (the bound was reached)
        self.released_early = 0

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, partition: str, offset: int, changes: dict[str, bytes | None]) -> dict[str, bytes | None]:
        """Keep the closing writes frame ``offset`` of ``partition`` made; returns the rest (to write now)."""
        now = {k: v for k, v in changes.items() if _adds_row(k, v)}
        if len(now) < len(changes):
            self._held.append((partition, offset, {k: v for k, v in changes.items() if k not in now}))
        if len(self._held) > self.max_frames:
            self.released_early += 1
            if self.released_early == 1:
                log.warning("labels.held_writes_full", frames=self.max_frames)
            now = {**self._held.popleft()[2], **now}  # the older change of a key first, this frame's wins
        return now

    def release(self, learned_upto: dict[str, int]) -> dict[str, bytes | None]:
        """The writes of frames below ``learned_upto`` (per partition: the offset a checkpoint resumes from)."""
        out: dict[str, bytes | None] = {}
        keep: deque[tuple[str, int, dict[str, bytes | None]]] = deque()
        for entry in self._held:
            partition, offset, changes = entry
            if offset < learned_upto.get(partition, -1):
                out.update(changes)
            else:
                keep.append(entry)
        self._held = keep
        return out

    def supersede(self, keys: set[str]) -> None:
        """Forget held writes of ``keys``: a newer write of them goes out now (a chunk expired and deleted)."""
        if keys:
            for _, _, changes in self._held:
                for key in keys & changes.keys():
                    del changes[key]

    def discard_partitions(self, partitions: set[str]) -> None:
        """Drop what is held for partitions another worker owns now (its writes must not be overwritten)."""
        self._held = deque(entry for entry in self._held if entry[0] not in partitions)

    def release_all(self) -> dict[str, bytes | None]:
        """Everything held, in order (a rebalance or a clean stop hands the state over)."""
        out: dict[str, bytes | None] = {}
        for _, _, changes in self._held:
            out.update(changes)
        self._held.clear()
        return out
