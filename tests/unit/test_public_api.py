"""The public API is what ``stream_mtl.__all__`` lists."""

import stream_mtl


def test_all_is_importable_and_sorted() -> None:
    assert stream_mtl.__all__ == sorted(stream_mtl.__all__)
    for name in stream_mtl.__all__:
        assert hasattr(stream_mtl, name), name
