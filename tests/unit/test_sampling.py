"""Task samplers on live streams, and the replay reservoir."""

from __future__ import annotations

import numpy as np

from stream_mtl.batching import AdaptiveSampler, AnnealedTemperatureSampler, Reservoir, TemperatureSampler
from stream_mtl.codec import TaskBatch
from stream_mtl.topology import EventSchema, FeatureSpec, SamplerSpec, TaskSpec, Topology
from stream_mtl.trainer import Trainer


def test_a_bursty_task_does_not_dominate_and_a_silent_one_does_not_stall() -> None:
    s = TemperatureSampler(temperature=3.0)
    shares = {"burst": 0, "quiet": 0}
    for _ in range(100):
        got = s.allocate({"burst": 100_000, "quiet": 100, "silent": 0}, 32)
        assert got["silent"] == 0 and sum(got.values()) == 32
        for t in shares:
            shares[t] += got[t]
    # proportional would give "quiet" 0.1 %; T=3 gives (100/100000)^(1/3) / (1 + that) ≈ 9 %
    assert 0.07 < shares["quiet"] / 3200 < 0.11
    assert TemperatureSampler().allocate({"a": 0, "b": 0}, 32) == {"a": 0, "b": 0}  # nothing to give: no hang


def test_annealed_temperature_moves_from_uniform_towards_proportional() -> None:
    s = AnnealedTemperatureSampler(start=100.0, end=1.0, steps=50)
    early = s.allocate({"a": 900, "b": 100}, 100)
    for _ in range(60):
        late = s.allocate({"a": 900, "b": 100}, 100)
    assert early["b"] > 40 and late["b"] == 10


def test_adaptive_sampler_raises_a_task_whose_loss_rises() -> None:
    s = AdaptiveSampler(temperature=1.0, boost=3.0)
    for _ in range(30):
        s.observe_losses({"steady": 1.0, "rising": 1.0})
    for k in range(5):
        s.observe_losses({"steady": 1.0, "rising": 1.0 + 0.5 * (k + 1)})
    got = s.allocate({"steady": 500, "rising": 500}, 40)
    assert got["rising"] == 30 and got["steady"] == 10


def test_reservoir_memory_is_bounded() -> None:
    r = Reservoir(capacity=64, d=3, k=1)
    for _ in range(100):
        r.add(np.ones((50, 3), np.float32), np.ones((50, 1), np.float32))
    assert r.n == 64 and r.x.shape == (64, 3) and r.seen == 5000


def _topology(**sampler: object) -> Topology:
    return Topology(
        name="smp",
        schema=EventSchema(fields={"x": "float", "a": "bool", "b": "bool"}),
        features=[FeatureSpec(name="n", inputs=["x"])],
        tasks=[TaskSpec(name="a", kind="binary", label="a"), TaskSpec(name="b", kind="binary", label="b")],
        sampler=SamplerSpec(**sampler),
        batch_size=8,
    )


def test_replay_mixes_old_examples_into_new_batches_and_composition_is_exported() -> None:
    tr = Trainer(_topology(replay_share=0.5, replay_size=16), device="cpu")
    old = np.full((8, 1), -5.0, np.float32)
    tr.observe(TaskBatch("a", [f"o{i}" for i in range(8)], old, [1.0] * 8))
    tr.train()
    new = np.full((8, 1), 5.0, np.float32)
    tr.observe(TaskBatch("a", [f"n{i}" for i in range(8)], new, [0.0] * 8))
    seen: list[np.ndarray] = []
    real_step = tr.step
    tr.step = lambda batch: seen.append(batch.x.copy()) or real_step(batch)  # type: ignore[method-assign]
    tr.train()
    rows = seen[0]
    assert rows.shape[0] == 8 + 4  # half as many again, from the reservoir
    assert (rows[:8] == 5.0).all() and (rows[8:] != 5.0).any()  # the replayed rows include old examples
    assert tr.snapshot()["batch_composition"] == {"a": 12}


def test_a_task_without_data_does_not_stall_training() -> None:
    tr = Trainer(_topology(kind="temperature", temperature=2.0), device="cpu")
    tr.observe(TaskBatch("a", [f"e{i}" for i in range(20)], np.zeros((20, 1), np.float32), [1.0] * 20))
    assert tr.train() == 3 and tr.pending() == 0  # task b never sent anything
