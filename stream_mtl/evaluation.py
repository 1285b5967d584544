"""Prequential per-task metrics with ``river.metrics``: every example is scored before it is learned.

Classification metrics share one river ``ConfusionMatrix`` fed once per (truth, prediction)
combination per batch with the count as sample weight, so a 1,000-event batch costs four
updates, not a thousand. Regression metrics (MAE, RMSE) are running means: a batch enters as
its mean absolute / squared error with the batch size as weight, which is exact.

>>> from stream_mtl.topology import TaskSpec
>>> m = TaskMetrics(TaskSpec(name="t", kind="binary", label="y"))
>>> m.update(np.array([1.0, 0.0, 1.0, 1.0]), np.array([True, False, False, True]))
>>> {k: round(v, 3) for k, v in m.values().items()}
{'f1': 0.8, 'accuracy': 0.75, 'n': 4}
>>> r = TaskMetrics(TaskSpec(name="r", kind="regression", label="y"))
>>> r.update(np.array([1.0, 2.0]), np.array([1.5, 1.0])); r.update(np.array([0.0]), np.array([0.0]))
>>> {k: round(v, 4) for k, v in r.values().items()}
{'mae': 0.5, 'rmse': 0.6455, 'n': 3}
"""

from __future__ import annotations

from typing import Any

import numpy as np
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
            self.metrics = {"mae": metrics.MAE(), "rmse": metrics.RMSE()}

    def update(self, y_true: np.ndarray, y_pred: np.ndarray) -> None:
        """Score a batch: labels and decided predictions as arrays (multilabel: ``[n, k]`` 0/1)."""
        n = len(y_true)
        if n == 0:
            return
        self.n += n
        kind = self.task.kind
        if kind == "regression":
            err = np.asarray(y_true, dtype=np.float64) - np.asarray(y_pred, dtype=np.float64)
            self.metrics["mae"].update(float(np.abs(err).mean()), 0.0, n)
            self.metrics["rmse"].update(float(np.sqrt((err**2).mean())), 0.0, n)
            return
        if kind == "multiclass":
            k = self.task.output_dim
            yt, yp = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
        else:  # binary, multilabel (flattened): 0/1 truth against 0/1 prediction
            k = 2
            yt = (np.asarray(y_true).reshape(-1) > 0.5).astype(np.int64)
            yp = (np.asarray(y_pred).reshape(-1) > 0.5).astype(np.int64)
        counts = np.bincount(yt * k + yp, minlength=k * k)
        for code in np.flatnonzero(counts):
            a, b = divmod(int(code), k)
            if kind == "binary":
                self.cm.update(bool(a), bool(b), int(counts[code]))  # the metrics share this matrix
            else:
                self.cm.update(a, b, int(counts[code]))

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
