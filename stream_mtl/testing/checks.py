"""Checking a topology's tasks: :func:`check_task`, :func:`check_topology`, and :func:`task_checks` for pytest."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stream_mtl.testing.checker import CHECKS, CheckResult, _Checker
from stream_mtl.testing.report import TopologyReport
from stream_mtl.testing.samples import DEFAULT_SAMPLE, sample_events
from stream_mtl.topology import Topology, load_topology

__all__ = ["TaskCheck", "check_task", "check_topology", "task_checks"]


def _as_topology(topology: Topology | str | Path) -> Topology:
    return topology if isinstance(topology, Topology) else load_topology(topology)


def _default_events(topology: Topology | str | Path, events: Iterable[Any] | None, seed: int) -> Iterable[Any] | None:
    if events is None and not isinstance(topology, Topology):
        return sample_events(topology, DEFAULT_SAMPLE, seed)[0]
    return events


def check_task(
    topology: Topology | str | Path, task_name: str, events: Iterable[Any] | None = None, *, seed: int = 0
) -> list[CheckResult]:
    """Run every check of :data:`CHECKS` on one task; one :class:`CheckResult` per check.

    ``events``: the sample (dicts, bytes, ``{"_label": …}`` items); default: the first
    :data:`DEFAULT_SAMPLE` events of the topology's producer when ``topology`` is a name or path,
    else :func:`synthetic_events`. Each task runs alone (with the tasks it depends on), so one
    broken task does not fail the others; ``malformed`` runs it beside every task that runs.
    """
    topo = _as_topology(topology)
    return _Checker(topo, _default_events(topology, events, seed), seed).results(task_name)


def check_topology(
    topology: Topology | str | Path, events: Iterable[Any] | None = None, *, seed: int = 0
) -> TopologyReport:
    """Every task's checks and the shared-trunk diagnostics (``events`` as for :func:`check_task`)."""
    return _Checker(_as_topology(topology), _default_events(topology, events, seed), seed).report()


class TaskCheck:
    """One (task, check) pair, run when called (on first use, with the other checks of its task)."""

    def __init__(self, checker: _Checker, task: str, check: str):
        self.checker, self.task, self.check = checker, task, check

    def result(self) -> CheckResult:
        return self.checker.result(self.task, self.check)

    def __call__(self) -> CheckResult:
        """The result; raises ``AssertionError`` with the reason when the check fails."""
        res = self.result()
        if not res.passed:
            raise AssertionError(f"task {self.task!r}, check {self.check!r} ({CHECKS[self.check]}): {res.reason}")
        return res

    def __repr__(self) -> str:
        return f"TaskCheck({self.task!r}, {self.check!r})"


def task_checks(topology: Topology | str | Path, events: Iterable[Any] | None = None, *, seed: int = 0) -> list[Any]:
    """``pytest.param`` per (task, check), id ``<task>-<check>``, for ``pytest.mark.parametrize``.

    Nothing runs at collection: each :class:`TaskCheck` runs its task's checks when first called
    (shared by the checks of that task)::

        @pytest.mark.parametrize("check", task_checks("yeast"))
        def test_task(check):
            check()
    """
    import pytest

    topo = _as_topology(topology)
    checker = _Checker(topo, _default_events(topology, events, seed), seed)
    return [pytest.param(TaskCheck(checker, t.name, c), id=f"{t.name}-{c}") for t in topo.tasks for c in CHECKS]
