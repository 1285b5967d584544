"""Test a pipeline without a broker: an in-process topology driver, per-task checks, a pytest helper.

The package's modules:

- :mod:`~stream_mtl.testing.driver`: :class:`TopologyDriver`, which runs a topology in-process and
  deterministically through the agents' own functions (what the rest is built on);
- :mod:`~stream_mtl.testing.samples`: sample events for the checks (a topology's producer, or
  :func:`synthetic_events` made from its schema);
- :mod:`~stream_mtl.testing.checker`: the per-task checks (:data:`CHECKS`) and the engine that runs
  them, sharing the driver runs of a sample;
- :mod:`~stream_mtl.testing.checks`: the public entry points, :func:`check_task`,
  :func:`check_topology` and :func:`task_checks` (pytest parameters);
- :mod:`~stream_mtl.testing.report`: :class:`TopologyReport`, the results of a topology and their table;
- :mod:`~stream_mtl.testing.command`: :func:`run_check`, the ``stream-mtl check`` command.

:func:`check_task` runs generic checks on one task (:data:`CHECKS`), :func:`check_topology` on
all of them plus the shared-trunk diagnostics (what ``stream-mtl check`` prints), and
:func:`task_checks` gives one pytest parameter per (task, check)::

    @pytest.mark.parametrize("check", task_checks("yeast"))
    def test_yeast_task(check):
        check()
"""

from stream_mtl.testing.checker import CHECKS, CheckResult
from stream_mtl.testing.checker import DIAGNOSTIC_ROWS as DIAGNOSTIC_ROWS
from stream_mtl.testing.checks import TaskCheck, check_task, check_topology, task_checks
from stream_mtl.testing.command import run_check
from stream_mtl.testing.driver import START_TIME as START_TIME
from stream_mtl.testing.driver import WORKER as WORKER
from stream_mtl.testing.driver import Record, TopologyDriver
from stream_mtl.testing.report import TopologyReport
from stream_mtl.testing.samples import DEFAULT_SAMPLE as DEFAULT_SAMPLE
from stream_mtl.testing.samples import sample_events, synthetic_events

__all__ = [
    "CHECKS",
    "CheckResult",
    "Record",
    "TaskCheck",
    "TopologyDriver",
    "TopologyReport",
    "check_task",
    "check_topology",
    "run_check",
    "sample_events",
    "synthetic_events",
    "task_checks",
]
