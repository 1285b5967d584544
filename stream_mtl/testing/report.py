"""A topology's check report: every task's results, the shared-trunk diagnostics, and their ``rich`` table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stream_mtl.diagnostics import TrunkGradients
from stream_mtl.topology import Topology

if TYPE_CHECKING:
    from stream_mtl.testing.checker import CheckResult

__all__ = ["TopologyReport"]


@dataclass
class TopologyReport:
    """Every task's check results and the shared-trunk diagnostics of a topology on a sample."""

    topology: Topology
    results: dict[str, list[CheckResult]]
    #: per trainer group (``""``: the shared model; an ``own_trainer`` task: its own model), the trunk
    #: gradients of the tasks that run, on the model trained on the sample
    gradients: dict[str, TrunkGradients]
    #: how far each head moved while training on the sample (relative L2 change)
    movement: dict[str, float]
    #: sample events, and late labels among them
    events: int
    labels: int = 0
    diagnostics_error: str | None = None

    @property
    def ok(self) -> bool:
        return all(r.passed for rs in self.results.values() for r in rs)

    def failures(self) -> list[CheckResult]:
        return [r for rs in self.results.values() for r in rs if not r.passed]

    def trunk(self, task: str) -> TrunkGradients | None:
        """The diagnostics of the model that trains ``task`` (``None``: the task does not run)."""
        return next((g for g in self.gradients.values() if task in g.share), None)

    def table(self) -> Any:
        """A ``rich`` table: per task pass/fail with reasons, trunk gradient share, worst conflict."""
        from rich.table import Table

        labels = f" + {self.labels} late labels" if self.labels else ""
        table = Table(title=f"stream-mtl check: {self.topology.name} ({self.events} sample events{labels})")
        table.add_column("task", style="bold")
        table.add_column("checks")
        table.add_column("failures")
        table.add_column("trunk grad share", justify="right")
        table.add_column("worst conflict")
        table.add_column("head moved", justify="right")
        for name, results in self.results.items():
            failed = [r for r in results if not r.passed]
            verdict = (
                f"[green]pass[/green] {len(results)}/{len(results)}"
                if not failed
                else f"[red]FAIL[/red] {len(results) - len(failed)}/{len(results)}"
            )
            g = self.trunk(name)
            share = f"{g.share[name]:.1%}" if g is not None else "-"
            worst = g.worst_conflict().get(name) if g is not None else None
            conflict = (
                f"{worst[0]} ({worst[1]:+.2f})" if worst else ("alone in its model" if g and len(g.share) == 1 else "-")
            )
            moved = f"{self.movement[name]:.1%}" if name in self.movement else "-"
            lines = [f"{r.check}: {r.reason}" for r in failed if not r.reason.startswith("not run")]
            skipped = [r.check for r in failed if r.reason.startswith("not run")]
            if skipped:
                lines.append(f"not run (it stops the pipeline): {', '.join(skipped)}")
            reasons = "\n".join(lines) or "-"
            table.add_row(name, verdict, reasons, share, conflict, moved)
        return table
