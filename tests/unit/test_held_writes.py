"""Held pending-store writes: released by partition and offset, bounded, superseded by newer writes."""

from __future__ import annotations

from stream_mtl.held_writes import HeldWrites


def test_rows_added_go_out_at_once_and_closing_writes_wait_for_the_checkpoint_of_their_partition() -> None:
    held = HeldWrites()
    assert held.hold("t:0", 5, {"0:y:1:1": b"frame", "0:y:1:1:joined": b"[0]"}) == {"0:y:1:1": b"frame"}
    assert held.hold("t:1", 9, {"1:y:2:2": None, "1:y:2:2:joined": None}) == {}  # a retired chunk waits too
    assert held.hold("t:0", 6, {"0:y:1:1:joined": b"[0,1]"}) == {}
    assert held.release({"t:0": 6, "t:1": 9}) == {"0:y:1:1:joined": b"[0]"}  # frame 6 and frame 9 not learned yet
    assert held.release({"t:0": 7}) == {"0:y:1:1:joined": b"[0,1]"}
    assert len(held) == 1 and held.release_all() == {"1:y:2:2": None, "1:y:2:2:joined": None}
    assert len(held) == 0


def test_the_bound_releases_the_oldest_frame_early() -> None:
    held = HeldWrites(max_frames=2)
    held.hold("t:0", 1, {"a:joined": b"[0]"})
    held.hold("t:0", 2, {"b:joined": b"[0]"})
    assert held.hold("t:0", 3, {"c:joined": b"[0]"}) == {"a:joined": b"[0]"}
    assert len(held) == 2 and held.released_early == 1


def test_a_newer_write_supersedes_what_is_held_and_lost_partitions_are_dropped() -> None:
    held = HeldWrites()
    held.hold("t:0", 1, {"k:joined": b"[0]", "j:joined": b"[1]"})
    held.hold("t:1", 1, {"m:joined": b"[2]"})
    held.supersede({"k", "k:joined"})  # the chunk expired and was deleted now: its old join mark must not follow
    held.discard_partitions({"t:1"})  # another worker owns it: its writes are not overwritten from here
    assert held.release_all() == {"j:joined": b"[1]"}
