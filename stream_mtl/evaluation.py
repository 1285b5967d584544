"""Prequential per-task metrics with ``river.metrics``: every example is scored before it is learned.

Binary metrics are fed once per (truth, prediction) combination per batch with the count as
sample weight, so a 1,000-event batch costs four metric updates, not a thousand.

>>> from stream_mtl.topology import TaskSpec
>>> m = TaskMetrics(TaskSpec(name="t", kind="binary", label="y"))
>>> m.update([1.0, 0.0, 1.0, 1.0], [True, False, False, True])
>>> {k: round(v, 3) for k, v in m.values().items()}
{'f1': 0.8, 'accuracy': 0.75, 'n': 4}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from river import metrics

from stream_mtl.topology import TaskSpec

__all__ = ["TaskMetrics", "micro_f1"]


class TaskMetrics:
    """The river metrics of one task, updated prequentially."""

    def __init__(self, task: TaskSpec):
        self.task = task
        self.n = 0
        self.cm = metrics.ConfusionMatrix()
        if task.kind == "binary":
            self.metrics: dict[str, Any] = {"f1": metrics.F1(cm=self.cm), "accuracy": metrics.Accuracy(cm=self.cm)}
        elif task.kind == "multiclass":
            self.metrics = {"accuracy": metrics.Accuracy(cm=self.cm), "macro_f1": metrics.MacroF1(cm=self.cm)}
        elif task.kind == "multilabel":
            self.metrics = {"accuracy": metrics.Accuracy(cm=self.cm)}  # per-label, flattened
        else:
            self.metrics = {"mae": metrics.MAE(), "rmse": metrics.RMSE(), "r2": metrics.R2()}

    def update(self, y_true: Sequence[Any], y_pred: Sequence[Any]) -> None:
        """Score a batch of predictions against its labels."""
        kind = self.task.kind
        self.n += len(y_true)
        if kind in ("binary", "multiclass", "multilabel"):
            counts: dict[tuple[Any, Any], int] = {}
            if kind == "multilabel":
                pairs = (
                    (int(a), int(b)) for ts, ps in zip(y_true, y_pred, strict=True) for a, b in zip(ts, ps, strict=True)
                )
            elif kind == "binary":
                pairs = ((bool(a), bool(b)) for a, b in zip(y_true, y_pred, strict=True))
            else:
                pairs = ((int(a), int(b)) for a, b in zip(y_true, y_pred, strict=True))
            for pair in pairs:
                counts[pair] = counts.get(pair, 0) + 1
            for (yt, yp), w in counts.items():
                self.cm.update(yt, yp, w)  # the metrics share this confusion matrix
        else:
            for yt, yp in zip(y_true, y_pred, strict=True):
                for m in self.metrics.values():
                    m.update(float(yt), float(yp))

    def values(self) -> dict[str, float]:
        out = {name: float(m.get()) for name, m in self.metrics.items()}
        out["n"] = self.n
        return out


def micro_f1(task_metrics: dict[str, TaskMetrics]) -> float | None:
    """Micro-averaged F1 over all binary tasks (TP, FP, FN summed across tasks)."""
    tp = fp = fn = 0.0
    seen = False
    for m in task_metrics.values():
        if m.task.kind != "binary":
            continue
        seen = True
        tp += m.cm.true_positives(True)
        fp += m.cm.false_positives(True)
        fn += m.cm.false_negatives(True)
    if not seen:
        return None
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0
