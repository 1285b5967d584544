"""Trainer-side augmentation: noise, mixup and SMOTE change what is learned, never what is predicted."""

from __future__ import annotations

import numpy as np

from stream_mtl.augment import Augmenter
from stream_mtl.batching import MixedBatch
from stream_mtl.codec import TaskBatch
from stream_mtl.topology import EventSchema, FeatureSpec, GaussianNoise, Mixup, Oversample, TaskSpec, Topology
from stream_mtl.trainer import Trainer


def _topology(augment: list) -> Topology:
    return Topology(
        name="aug",
        schema=EventSchema(fields={"x0": "float", "x1": "float", "y": "bool", "z": "bool"}),
        features=[FeatureSpec(name="n", inputs=["x0", "x1"])],
        tasks=[
            TaskSpec(name="t", kind="binary", label="y", augment=augment),
            TaskSpec(name="plain", kind="binary", label="z"),
        ],
        batch_size=8,
    )


def _batch(n: int = 8) -> MixedBatch:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    y = (rng.random((n, 1)) > 0.5).astype(np.float32)
    return MixedBatch(x, y, {"t": (0, n // 2), "plain": (n // 2, n)})


def test_noise_touches_only_its_task_and_a_copy() -> None:
    batch = _batch()
    before = batch.x.copy()
    out = Augmenter(_topology([GaussianNoise(std=0.3)])).apply(batch)
    np.testing.assert_array_equal(batch.x, before)  # input untouched
    assert not np.array_equal(out.x[0:4], before[0:4])
    np.testing.assert_array_equal(out.x[4:8], before[4:8])  # the other task's rows are not augmented


def test_mixup_mixes_inputs_and_labels_within_the_task() -> None:
    out = Augmenter(_topology([Mixup(alpha=1.0)])).apply(_batch())
    y = out.y[0:4, 0]
    assert ((y > 0) & (y < 1)).any()  # soft labels from mixing
    assert not np.array_equal(out.x[0:4], _batch().x[0:4])


def test_smote_fills_a_sparse_task_up_to_its_share_with_same_label_interpolations() -> None:
    aug = Augmenter(_topology([Oversample(share=0.5, k=3, pool=64)]))
    rng = np.random.default_rng(1)
    pos = rng.normal(5.0, 0.1, size=(20, 2)).astype(np.float32)
    neg = rng.normal(-5.0, 0.1, size=(20, 2)).astype(np.float32)
    aug.remember("t", np.concatenate([pos, neg]), np.concatenate([np.ones((20, 1)), np.zeros((20, 1))]))
    batch = MixedBatch(np.zeros((8, 2), np.float32), np.zeros((8, 1), np.float32), {"t": (0, 1), "plain": (1, 8)})
    out = aug.apply(batch)
    a, b = out.blocks["t"]
    assert b - a == 4  # 1 real + 3 synthetic = half of the 8-row batch
    synth_x, synth_y = out.x[a + 1 : b], out.y[a + 1 : b, 0]
    for x, y in zip(synth_x, synth_y, strict=True):  # each interpolates within its label's cluster
        assert (x > 4).all() if y == 1 else (x < -4).all()
    assert aug.synthetic["t"] == 3


def test_predictions_are_the_same_with_and_without_augmentation() -> None:
    x = np.random.default_rng(2).normal(size=(16, 2)).astype(np.float32)
    batch = TaskBatch("t", [f"e{i}" for i in range(16)], x, [True, False] * 8)
    plain = Trainer(_topology([]), device="cpu")
    noisy = Trainer(_topology([GaussianNoise(std=1.0), Mixup()]), device="cpu")
    assert plain.observe(batch).scores == noisy.observe(batch).scores
    plain.train()
    noisy.train()  # they learned from different inputs …
    p = [p.detach().clone() for p in plain.model.parameters()]
    q = [q.detach().clone() for q in noisy.model.parameters()]
    assert any(not np.allclose(a.numpy(), b.numpy()) for a, b in zip(p, q, strict=True))
