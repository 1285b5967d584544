"""Drift detectors on the prequential error stream, alerts with stable ids, and the feedback actions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream_mtl.checkpoint import CheckpointStore
from stream_mtl.codec import TaskBatch
from stream_mtl.drift import DriftMonitor, ErrorDetector
from stream_mtl.synthetic import SyntheticStream, synthetic_topology
from stream_mtl.topology import DriftSpec, TopologyError
from stream_mtl.trainer import Trainer
from stream_mtl.trainer_host import TrainerSession


def errors(n_before: int, p_before: float, n_after: int, p_after: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.random(n_before) < p_before, rng.random(n_after) < p_after]).astype(float)


@pytest.mark.parametrize("kind", ["adwin", "page_hinkley", "ddm"])
def test_each_detector_fires_within_500_events_of_a_jump_in_error(kind: str) -> None:
    det = ErrorDetector.make(kind)
    stream = errors(3000, 0.1, 1000, 0.6)
    first = None
    for start in range(0, len(stream), 100):  # in batches, as the trainer feeds it
        at = det.update(stream[start : start + 100])
        if at is not None and start + at >= 3000:
            first = start + at
            break
    assert first is not None and first - 3000 < 500, first


@pytest.mark.parametrize("seed", range(3))
def test_adwin_stays_quiet_on_a_stationary_error_stream(seed: int) -> None:
    det = ErrorDetector.make("adwin")
    assert det.update(errors(10_000, 0.2, 0, 0.0, seed)) is None and det.detections == 0


def test_alert_ids_are_the_same_for_the_same_window() -> None:
    topo = synthetic_topology(SyntheticStream(n_features=4, n_binary=1, n_regression=0), name="d")
    y = np.zeros(3000, dtype=bool)
    decided = np.concatenate([np.zeros(2000, dtype=bool), np.ones(1000, dtype=bool)])  # mistakes from row 2000
    a = DriftMonitor(topo, "app", "w1").observe("y0", y, decided, {"d.events:0": [5000, 7999]})
    b = DriftMonitor(topo, "app", "w2").observe("y0", y, decided, {"d.events:0": [5000, 7999]})  # a replay elsewhere
    assert len(a) == 1 and a[0].id == b[0].id and a[0].worker != b[0].worker
    assert a[0].details["window"] == "d.events:0@7" and a[0].details["estimate"] > 0.5


def test_ddm_needs_a_classification_task() -> None:
    gen = SyntheticStream(n_features=4, n_binary=1, n_regression=1)
    topo = synthetic_topology(gen, name="d")
    tasks = [t.model_copy(update={"drift": DriftSpec(detectors=["ddm"])}) if t.name == "r0" else t for t in topo.tasks]
    with pytest.raises(TopologyError, match=r"tasks\[1\]\.drift\.detectors: ddm needs 0/1 errors"):
        type(topo)(**{**topo.model_dump(by_alias=True), "tasks": [t.model_dump() for t in tasks]})


def _drifting_session(tmp_path, actions: list[str], cooldown: float = 60.0) -> tuple[TrainerSession, list]:
    gen = SyntheticStream(n_features=4, n_binary=2, n_regression=0, seed=1)
    base = synthetic_topology(gen, name="fb", batch_size=64)
    spec = DriftSpec(actions=actions, cooldown_s=cooldown, boost_steps=5)
    topo = base.model_copy(update={"tasks": [t.model_copy(update={"drift": spec}) for t in base.tasks]})
    session = TrainerSession(topo, CheckpointStore(tmp_path, topo.spec_hash()), "fb", "w1")
    return session, topo


def _frame(task: str, start: int, n: int, flip: bool) -> TaskBatch:
    rng = np.random.default_rng(start)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] > 0) ^ flip
    return TaskBatch(
        task,
        [f"e{start + i}" for i in range(n)],
        x,
        y.astype(float).tolist(),
        offsets={"fb.events:0": [start, start + n - 1]},
    )


def _run(session: TrainerSession, flip_at: int, n: int = 6000, step: int = 200) -> list:
    from stream_mtl.codec import encode_batch

    alerts = []
    for start in range(0, n, step):
        _out, _changes, recs = session.process([encode_batch(_frame("y0", start, step, start >= flip_at))])
        alerts += recs
    import orjson

    return [orjson.loads(r) for r in alerts]


def test_a_concept_flip_raises_a_drift_alert_and_the_declared_actions_once(tmp_path) -> None:
    session, _ = _drifting_session(tmp_path, ["boost_sampling", "raise_lr"])
    lr_before = session.trainer.optimizer.param_groups[0]["lr"]
    alerts = _run(session, flip_at=3000)
    drifts = [a for a in alerts if a["kind"] == "drift" and a["task"] == "y0"]
    actions = [a for a in alerts if a["kind"] == "action"]
    assert drifts and drifts[0]["details"]["window"].startswith("fb.events:0@")
    first_at = int(drifts[0]["details"]["window"].rsplit("@", 1)[1]) * 1000
    assert first_at + 999 >= 3000 and first_at < 3500  # within 500 events of the flip (window resolution)
    # one drift (cool-down 60 s) → each action once, recorded with the alert it answers
    assert [a["details"]["action"] for a in actions] == ["boost_sampling", "raise_lr"]
    assert {a["details"]["drift_alert"] for a in actions} == {drifts[0]["id"]}
    heads = [g for g in session.trainer.optimizer.param_groups if g.get("name") in ("head.y0", "trunk")]
    assert len(heads) == 2 and all(g["lr"] == pytest.approx(lr_before) for g in heads)  # boosted 5 steps, then back


def test_raise_lr_and_reset_head_and_rollback_change_what_they_say(tmp_path) -> None:
    tr = Trainer(synthetic_topology(SyntheticStream(n_features=4, n_binary=2, n_regression=0), name="x"), device="cpu")
    base = tr.optimizer.param_groups[0]["lr"]
    tr.raise_lr("y1", 3.0, steps=2)
    group = next(g for g in tr.optimizer.param_groups if g.get("name") == "head.y1")
    trunk = next(g for g in tr.optimizer.param_groups if g.get("name") == "trunk")
    assert group["lr"] == pytest.approx(3 * base) and trunk["lr"] == pytest.approx(3 * base)
    assert all(id(p) not in {id(q) for q in trunk["params"]} for p in tr.model.heads["y1"].parameters())
    tr.raise_lr("y1", 3.0, steps=2)  # again while boosted: restarts, does not compound
    assert group["lr"] == pytest.approx(3 * base)
    before = tr.model.heads["y1"].weight.detach().clone()
    tr.reset_head("y1")
    assert not torch.equal(before, tr.model.heads["y1"].weight)

    session, _topo = _drifting_session(tmp_path, ["rollback"])
    _run(session, flip_at=10**9, n=1000)  # learn a little, no drift
    assert session.checkpoint() is not None
    saved_step = session.trainer.steps
    alerts = _run(session, flip_at=0, n=4000)  # everything flipped: drift → roll back to the checkpoint
    rolled = [a for a in alerts if a["kind"] == "action"]
    assert rolled and rolled[0]["details"]["to_step"] == saved_step


def test_the_cool_down_keeps_one_drift_from_firing_a_storm_of_actions(tmp_path) -> None:
    from stream_mtl.alerts import Alert

    session, _ = _drifting_session(tmp_path, ["boost_sampling"], cooldown=60)
    now = [1000.0]
    session.trainer.drift.clock = lambda: now[0]

    def drift(n: int) -> list[str]:
        alert = Alert(f"alrt_{n}", "drift", "fb", "y0", "adwin", "w1", now[0], {})
        return [a.kind for a in session._feedback([alert])]

    assert drift(1) == ["drift", "action"]
    now[0] += 30
    assert drift(2) == ["drift"]  # within the cool-down: recorded, no action
    now[0] += 31
    assert drift(3) == ["drift", "action"]
    assert session.trainer.sampler.boost_factor("y0") == pytest.approx(3.0)


def test_feature_drift_watches_the_selected_columns_and_names_them() -> None:
    from stream_mtl.drift import FeatureDriftMonitor

    gen = SyntheticStream(n_features=3, n_binary=1, n_regression=0)
    with pytest.raises(TopologyError, match=r"drift_features\[0\]: 'f9' is not a feature column"):
        synthetic_topology(gen, drift_features=["f9"])
    monitor = FeatureDriftMonitor(synthetic_topology(gen, drift_features=["f0", "f2"]), "app", "w1")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6000, 3)).astype(np.float32)
    x[3000:, 2] += 1.0  # f2 shifts; f0 and f1 do not (f1 is not watched anyway)
    alerts = [a for start in range(0, 6000, 500) for a in monitor.observe(x[start : start + 500], "s:0", start + 499)]
    assert {a.details["feature"] for a in alerts} == {"f2"} and alerts[0].task == "*"
    assert alerts[0].details["window"] in {"s:0@3", "s:0@4"}  # within ~1,000 events of the shift


def test_a_checkpoint_taken_during_a_boost_restores_the_layout_at_base_rates(tmp_path) -> None:
    topo = synthetic_topology(SyntheticStream(n_features=4, n_binary=2, n_regression=0), name="x", batch_size=16)
    a = Trainer(topo, device="cpu")
    base = a.optimizer.param_groups[0]["lr"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)

    def feed(tr: Trainer) -> None:
        for t in ("y0", "y1"):
            tr.observe(TaskBatch(t, [f"e{i}" for i in range(64)], x, (x[:, 0] > 0).astype(float).tolist()))
        tr.train()

    feed(a)
    a.raise_lr("y1", 3.0, steps=1000)
    feed(a)
    store = CheckpointStore(tmp_path, topo.spec_hash())
    store.save(a.state_tensors(), a.state_json())
    b = Trainer(topo, device="cpu", seed=7)
    b.restore(*store.load_latest())
    assert [g.get("name") for g in b.optimizer.param_groups] == [g.get("name") for g in a.optimizer.param_groups]
    assert all(g["lr"] == pytest.approx(base) for g in b.optimizer.param_groups)  # the boost is not state
    assert b.optimizer.state  # the moments came along (same layout)
    a._end_lr_boosts()
    feed(a), feed(b)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_undrained_alerts_are_bounded(monkeypatch) -> None:
    import stream_mtl.drift as drift_module

    monkeypatch.setattr(drift_module, "MAX_UNDRAINED", 2)
    topo = synthetic_topology(SyntheticStream(n_features=4, n_binary=1, n_regression=0), name="d")
    monitor = DriftMonitor(topo, "app", "w1")
    y = np.zeros(3000, dtype=bool)
    decided = np.concatenate([np.zeros(2000, dtype=bool), np.ones(1000, dtype=bool)])
    for k in range(4):  # four drifts, nobody drains
        monitor.detectors["y0"] = [ErrorDetector.make("adwin")]
        monitor.observe("y0", y, decided, {"d.events:0": [k * 5000, k * 5000 + 2999]})
    assert len(monitor.drain()) == 2 and monitor.drain() == []
