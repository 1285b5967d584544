"""Buffers are bounded; samplers split batches as declared and survive bursty or silent tasks."""

import numpy as np
import pytest

from stream_mtl.batching import TaskBuffer, TemperatureSampler, assemble


def test_proportional_over_many_batches() -> None:
    s = TemperatureSampler(1.0)
    totals = {"a": 0, "b": 0, "c": 0}
    for _ in range(100):
        for t, k in s.allocate({"a": 600, "b": 300, "c": 100}, 16).items():
            totals[t] += k
    assert sum(totals.values()) == 1600
    assert totals["a"] / 1600 == pytest.approx(0.6, abs=0.02)
    assert totals["b"] / 1600 == pytest.approx(0.3, abs=0.02)
    assert totals["c"] / 1600 == pytest.approx(0.1, abs=0.02)


def test_allocation_never_exceeds_what_is_there() -> None:
    s = TemperatureSampler(float("inf"))
    assert s.allocate({"a": 100, "b": 2, "c": 0}, 16) == {"a": 14, "b": 2, "c": 0}
    assert s.allocate({"a": 3, "b": 2}, 16) == {"a": 3, "b": 2}
    assert s.allocate({"a": 0, "b": 0}, 16) == {"a": 0, "b": 0}  # silent tasks: no crash


def test_temperature_flattens() -> None:
    p1 = TemperatureSampler(1.0).allocate({"a": 900, "b": 100}, 100)
    p3 = TemperatureSampler(3.0).allocate({"a": 900, "b": 100}, 100)
    assert p1["b"] == 10 and p3["b"] > p1["b"]


def test_buffer_is_bounded_and_fifo() -> None:
    b = TaskBuffer(capacity=100)
    for i in range(50):
        b.push(np.full((7, 2), i, np.float32), np.full((7, 1), i, np.float32))
    assert len(b) == 100 and b.dropped == 250
    x, _y = b.pop(3)
    assert x[:, 0].tolist() == [35.0, 35.0, 36.0]  # rows 250..252 of 350: the oldest survivors
    assert len(b) == 97


def test_assemble_mixes_and_pads() -> None:
    bufs = {"a": TaskBuffer(10), "b": TaskBuffer(10)}
    bufs["a"].push(np.zeros((4, 2), np.float32), np.ones((4, 1), np.float32))
    bufs["b"].push(np.ones((4, 2), np.float32), np.ones((4, 3), np.float32))
    mb = assemble(bufs, {"a": 2, "b": 3}, k_max=3)
    assert mb.x.shape == (5, 2) and mb.y.shape == (5, 3)
    assert mb.blocks == {"a": (0, 2), "b": (2, 5)} and mb.counts == {"a": 2, "b": 3}
    assert len(bufs["a"]) == 2 and len(bufs["b"]) == 1
