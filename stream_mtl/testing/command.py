"""The ``stream-mtl check PATH`` command: validate a topology, check its tasks on sample data, print the table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stream_mtl.testing.checker import DIAGNOSTIC_ROWS, _Checker, _describe
from stream_mtl.testing.samples import DEFAULT_SAMPLE, _shown, sample_events, synthetic_events
from stream_mtl.topology import TopologyError, load_topology, resolve_topology_path

__all__ = ["run_check"]


def run_check(ref: str | Path, n_events: int = DEFAULT_SAMPLE, seed: int = 0, console: Any = None) -> int:
    """``stream-mtl check``: validate the topology, check every task on sample data, print a table.

    Returns the exit status: 0 when every check passes, 1 when one fails, 2 when the topology is invalid.
    """
    from rich.console import Console

    console = console or Console(width=160)
    try:
        topology = load_topology(ref)
        path = resolve_topology_path(ref)
    except TopologyError as exc:
        console.print(f"[red]invalid topology[/red]: {exc}", markup=True, highlight=False)
        return 2
    try:
        events, origin = sample_events(ref, n_events, seed)
    except Exception as exc:  # the producer itself fails: say so, and check the tasks on generated events
        events = synthetic_events(topology, n_events, seed)
        origin = f"{n_events} synthetic events ([yellow]producer.py failed[/yellow]: {_describe(exc)})"
    console.print(
        f"topology {topology.name!r} ({_shown(path)}): valid; {len(topology.tasks)} tasks, "
        f"input width {topology.input_dim}",
        highlight=False,
    )
    console.print(f"sample: {origin}", highlight=False, markup=True)
    report = _Checker(topology, events, seed).report()
    console.print(report.table())
    if report.diagnostics_error:
        console.print(f"diagnostics: {report.diagnostics_error}", highlight=False)
    else:
        console.print(
            f"trunk grad share and worst conflict: on the model trained on the sample, ≤ {DIAGNOSTIC_ROWS} labelled "
            "rows per task\n(conflict: the task whose trunk gradient has the lowest cosine with this one's); "
            "head moved: ‖Δθ‖/‖θ₀‖ over the sample",
            highlight=False,
        )
    failed = report.failures()
    if failed:
        tasks = sorted({r.task for r in failed})
        console.print(f"[red]FAILED[/red]: {len(failed)} checks of {len(tasks)} tasks ({', '.join(tasks)})")
        return 1
    n = sum(len(rs) for rs in report.results.values())
    console.print(f"[green]ok[/green]: {n} checks of {len(report.results)} tasks passed")
    return 0
