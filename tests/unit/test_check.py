"""Per-task checks and ``stream-mtl check``: a broken task is named, the others pass; Yeast passes."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stream_mtl import EventSchema, FeatureSpec, ModelSpec, TaskSpec
from stream_mtl.cli import app
from stream_mtl.testing import CHECKS, TaskCheck, check_task, check_topology, synthetic_events, task_checks
from stream_mtl.topology import TokenDropout, Topology, load_topology

BROKEN = textwrap.dedent(
    '''
    """Deliberately broken: ``picky``'s predicate and ``fussy``'s loss raise on some inputs, ``frozen``'s
    loss never reaches its head. ``ok`` and ``amount`` are fine."""

    import torch
    from torch.nn import functional as F

    from stream_mtl import EventSchema, FeatureSpec, ModelSpec, TaskSpec, Topology


    def picky(event):
        if event["x1"] > 1.0:
            raise ValueError(f"cannot segment x1={event['x1']}")
        return True


    def frozen_loss(logits, y):
        return torch.tensor(0.0, requires_grad=True)


    def fussy_loss(logits, y):
        if logits.shape[0] > 20:
            raise ValueError(f"fussy_loss takes at most 20 rows, got {logits.shape[0]}")
        return F.binary_cross_entropy_with_logits(logits, y)


    topology = Topology(
        name="broken",
        schema=EventSchema(
            fields={"x1": "float", "x2": "float", "a": "bool", "b": "bool", "c": "bool", "e": "bool", "d": "float"}
        ),
        features=[FeatureSpec(name="num", inputs=["x1", "x2"])],
        tasks=[
            TaskSpec(name="ok", kind="binary", label="a"),
            TaskSpec(name="picky", kind="binary", label="b", where=picky),
            TaskSpec(name="frozen", kind="binary", label="c", loss=frozen_loss),
            TaskSpec(name="fussy", kind="binary", label="e", loss=fussy_loss),
            TaskSpec(name="amount", kind="regression", label="d"),
        ],
        model=ModelSpec(trunk=[16]),
        batch_size=32,
        ingest_batch=50,
    )
    '''
)
N_EVENTS = 150


@pytest.fixture(scope="module")
def broken_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("broken")
    (folder / "topology.py").write_text(BROKEN)
    return folder


@pytest.fixture(scope="module")
def broken(broken_path: Path) -> Topology:
    return load_topology(broken_path)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    n = torch.get_num_threads()  # tiny models: one thread is faster (the check command sets one too)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def by_check(results: list) -> dict:
    return {r.check: r for r in results}


def test_a_raising_where_predicate_is_named_with_the_event(broken: Topology) -> None:
    res = by_check(check_task(broken, "picky", synthetic_events(broken, N_EVENTS)))
    assert list(res) == list(CHECKS)
    assert not res["runs"].passed
    assert re.search(
        r"where= raised on event 'broken-\d+': ValueError: cannot segment .* \(in picky, ", res["runs"].reason
    )
    assert res["labels"].passed  # its labels are fine
    assert not res["gradient"].passed and res["gradient"].reason.startswith("not run")


def test_a_head_without_gradient_fails_only_the_gradient_check(broken: Topology) -> None:
    res = by_check(check_task(broken, "frozen", synthetic_events(broken, N_EVENTS)))
    assert [c for c, r in res.items() if not r.passed] == ["gradient"]
    assert "no gradient flows into heads.frozen" in res["gradient"].reason


def test_the_healthy_tasks_pass_beside_the_broken_ones(broken: Topology) -> None:
    report = check_topology(broken, synthetic_events(broken, N_EVENTS))
    failed = {(r.task, r.check) for r in report.failures()}
    assert {t for t, _ in failed} == {"picky", "frozen", "fussy"}
    assert ("fussy", "runs") in failed and ("frozen", "gradient") in failed
    fussy = by_check(report.results["fussy"])["runs"].reason
    assert "ValueError: fussy_loss takes at most 20 rows" in fussy and "(in fussy_loss, topology.py:" in fussy
    ok = by_check(report.results["ok"])
    assert "other tasks went on" in ok["malformed"].reason  # next to frozen, without the tasks that stop it
    assert ok["malformed"].reason.startswith("dead-lettered (validate: field 'a'")
    # diagnostics cover the tasks that run: the frozen head sends nothing into the trunk
    assert list(report.gradients) == [""]  # one model: the shared one
    g = report.gradients[""]
    assert set(g.share) == {"ok", "frozen", "amount"} and report.trunk("picky") is None
    assert g.share["frozen"] == 0.0 and g.share["ok"] > 0 and report.movement["frozen"] == 0.0


def test_task_checks_parametrise_every_task_and_check_lazily(broken: Topology) -> None:
    params = task_checks(broken, synthetic_events(broken, 60))
    assert [p.id for p in params][:2] == ["ok-runs", "ok-deterministic"]
    assert len(params) == len(broken.tasks) * len(CHECKS)
    check = params[0].values[0]
    assert isinstance(check, TaskCheck) and check.checker._runs == {}  # nothing ran at collection
    assert check().passed
    picky = next(p.values[0] for p in params if p.id == "picky-runs")
    with pytest.raises(AssertionError, match=r"task 'picky', check 'runs'.*where= raised"):
        picky()


def test_the_check_command_names_the_broken_tasks_and_fails(broken_path: Path) -> None:
    result = CliRunner().invoke(app, ["check", str(broken_path), "--events", str(N_EVENTS)])
    out = result.output
    assert result.exit_code == 1, out
    assert "valid; 5 tasks" in out and f"{N_EVENTS} synthetic events (no producer.py)" in out
    rows = {m.group(1): m.group(2) for m in re.finditer(r"│ (\w+)\s+│ (pass|FAIL) ", out)}
    assert rows == {"ok": "pass", "picky": "FAIL", "frozen": "FAIL", "fussy": "FAIL", "amount": "pass"}
    assert "FAILED: " in out and "(frozen, fussy, picky)" in out


def test_the_check_command_refuses_an_invalid_topology(tmp_path: Path) -> None:
    (tmp_path / "topology.py").write_text(BROKEN.replace('label="a"', 'label="nope"'))
    result = CliRunner().invoke(app, ["check", str(tmp_path)])
    assert result.exit_code == 2
    assert "invalid topology" in result.output and "tasks[0].label: 'nope' is not a field" in result.output


def test_yeast_passes_every_check() -> None:
    result = CliRunner().invoke(app, ["check", "topologies/yeast", "--events", "200"])
    out = result.output
    assert result.exit_code == 0, out
    assert "the first 200 events of" in out
    rows = {m.group(1): m.group(2) for m in re.finditer(r"│ (class\d+)\s+│ (pass|FAIL) 7/7", out)}
    assert rows == {f"class{i}": "pass" for i in range(1, 15)}
    assert re.search(r"ok: 98 checks of 14 tasks passed", out)


def _nan_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits * float("nan")).mean()


def _coin(event: dict) -> bool:
    return bool(np.random.random() < 0.5)  # a predicate that is not a function of the event


TINY = Topology(
    name="tiny",
    schema=EventSchema(fields={"x": "float", "body": "str", "a": "bool", "b": "bool", "c": "bool"}),
    features=[FeatureSpec(name="num", inputs=["x"]), FeatureSpec(name="text", kind="text", inputs=["body"], dim=16)],
    tasks=[
        TaskSpec(name="words", kind="binary", label="a", augment=[TokenDropout(feature="text", p=0.5)]),
        TaskSpec(name="coin", kind="binary", label="b", where=_coin),
        TaskSpec(name="nan", kind="binary", label="c", loss=_nan_loss),
    ],
    model=ModelSpec(trunk=[8]),
    batch_size=16,
    ingest_batch=40,
)


def test_each_check_can_fail() -> None:
    events = synthetic_events(TINY, 120)
    coin = by_check(check_task(TINY, "coin", events))
    assert coin["runs"].passed and not coin["deterministic"].passed
    assert "differ between two runs" in coin["deterministic"].reason
    nan = by_check(check_task(TINY, "nan", events))
    assert not nan["finite_loss"].passed and "its loss is nan at step 1" in nan["finite_loss"].reason
    bad = [*events, {**events[0], "id": "bad-label", "a": "yes"}]
    words = by_check(check_task(TINY, "words", bad))
    assert not words["labels"].passed and "event 'bad-label'" in words["labels"].reason
    assert words["augmentation"].passed and "frames with training copies" in words["augmentation"].reason


def test_the_augmentation_check_catches_a_copy_that_leaks_into_the_predicted_input(monkeypatch) -> None:
    from stream_mtl.routing import Router

    augment = Router._augment_text

    def leaky(self, tr, x, rows, tokens):  # the bug: the augmented copy is written over what is predicted
        x_train = augment(self, tr, x, rows, tokens)
        x[:] = x_train
        return x_train

    monkeypatch.setattr(Router, "_augment_text", leaky)
    res = by_check(check_task(TINY, "words", synthetic_events(TINY, 120)))
    assert not res["augmentation"].passed and "changed the inputs that are predicted" in res["augmentation"].reason
