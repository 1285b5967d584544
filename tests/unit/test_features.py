"""Shared features: the batch-merged running statistics equal the exact ones."""

import numpy as np

from stream_mtl.features import RunningStandardizer


def test_batch_merge_equals_full_statistics() -> None:
    rng = np.random.default_rng(1)
    data = rng.normal(3.0, 2.0, size=(1000, 4))
    s = RunningStandardizer(4)
    for chunk in np.array_split(data, 17):
        s.update(chunk)
    np.testing.assert_allclose(s.mean, data.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(s.std, data.std(axis=0), rtol=1e-6)


def test_state_round_trip_continues_identically() -> None:
    rng = np.random.default_rng(2)
    a, b = RunningStandardizer(3), None
    a.update(rng.normal(size=(10, 3)))
    b = RunningStandardizer.from_state(a.state())
    nxt = rng.normal(size=(5, 3))
    np.testing.assert_array_equal(a.update_transform(nxt), b.update_transform(nxt))
