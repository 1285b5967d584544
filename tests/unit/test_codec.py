"""The batch frame and the event codec."""

import numpy as np
import pytest

from stream_mtl.codec import CodecError, TaskBatch, decode_batch, encode_batch


def test_round_trip_keeps_everything() -> None:
    x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    b = TaskBatch(
        "t", [f"e{i}" for i in range(5)], x, [1.0, 0.0, 1.0, 1.0, 0.0], "fv1", {"s:0": [3, 7]}, round="r1", round_size=3
    )
    back = decode_batch(encode_batch(b))
    assert back.ids == b.ids and back.y == b.y and back.offsets == b.offsets
    assert (back.round, back.round_size, back.feature_version) == ("r1", 3, "fv1")
    np.testing.assert_array_equal(back.x, x)
    back.x[0, 0] = 1.0  # writable


def test_empty_batch() -> None:
    b = TaskBatch("t", [], np.zeros((0, 4), np.float32), [])
    assert len(decode_batch(encode_batch(b))) == 0


@pytest.mark.parametrize("data", [b"", b"nope-not-a-frame", b"SMT1\x00\x00\x00\x05{bad}"])
def test_garbage_is_a_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode_batch(data)


def test_truncated_payload() -> None:
    frame = encode_batch(TaskBatch("t", ["a"], np.ones((1, 3), np.float32), [1.0]))
    with pytest.raises(CodecError, match="payload"):
        decode_batch(frame[:-2])
