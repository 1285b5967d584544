"""The per-task checks (:data:`CHECKS`) and the engine that runs them on one sample, sharing its driver runs."""

from __future__ import annotations

import math
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stream_mtl.codec import TaskBatch
from stream_mtl.diagnostics import TrunkGradients, head_movement, head_vectors, trunk_gradients
from stream_mtl.ingest import DeadLetter, EventValidator
from stream_mtl.testing.driver import TopologyDriver
from stream_mtl.testing.report import TopologyReport
from stream_mtl.testing.samples import DEFAULT_SAMPLE, synthetic_events
from stream_mtl.topology import Topology

__all__ = ["CHECKS", "DIAGNOSTIC_ROWS", "CheckResult"]

#: Labelled rows per task at most in the batch the diagnostics are computed on.
DIAGNOSTIC_ROWS = 256

#: Each check's name and what it verifies.
CHECKS: dict[str, str] = {
    "runs": "the task (with the tasks it depends on) runs through the pipeline on the sample: "
    "its where= predicate and its loss do not raise, and events reach it",
    "deterministic": "the same seed and events give the same task frames, predictions, batches and losses",
    "labels": "every label of the task in the sample (on events and late) has the declared type",
    "augmentation": "augmentation touches training copies only: without it, the predicted inputs and the "
    "predictions made before any training are the same",
    "malformed": "an event with a malformed label for the task goes to the DLQ with a reason, and every other "
    "event is still predicted for every task",
    "gradient": "the task's head receives a non-zero gradient and its parameters change when it trains",
    "finite_loss": "every training loss of the task and every prediction score is finite",
}


#: Checks that cannot say anything about a task whose run stops with an error.
_NEEDS_A_RUN = frozenset({"deterministic", "augmentation", "malformed", "gradient", "finite_loss"})


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check of one task."""

    task: str
    check: str
    passed: bool
    reason: str = ""

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.task} {self.check}: {verdict}" + (f" ({self.reason})" if self.reason else "")


@dataclass
class _Run:
    """What one driver run over some events gave (or the error that stopped it)."""

    tasks: list[str]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    batches: list[dict[str, int]] = field(default_factory=list)
    losses: list[dict[str, float]] = field(default_factory=list)
    frames: list[TaskBatch] = field(default_factory=list)
    movement: dict[str, float] = field(default_factory=dict)
    #: per trainer group (``""``: the shared model), the trunk and head gradients of its trained model
    gradients: dict[str, TrunkGradients] = field(default_factory=dict)
    error: str | None = None

    def head_norm(self, task: str) -> float | None:
        """The norm of the gradient reaching the task's head (``None``: none reaches it, or not computed)."""
        return next((g.head_norm.get(task) for g in self.gradients.values() if task in g.head_norm), None)


def _describe(exc: BaseException) -> str:
    """``Type: message``, and the last place in the user's code it came from."""
    here = str(Path(__file__).resolve().parents[1])  # the stream_mtl package
    where = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        fname = str(Path(frame.filename).resolve())
        if not fname.startswith(here) and "site-packages" not in fname:
            where = f" (in {frame.name}, {Path(fname).name}:{frame.lineno})"
            break
    return f"{type(exc).__name__}: {exc}{where}"


def _with_tasks(topology: Topology, tasks: list[Any]) -> Topology:
    """The topology with other tasks (validated again)."""
    data = {name: getattr(topology, name) for name in Topology.model_fields}
    data["tasks"] = tasks
    return Topology(**data)


def _subset(topology: Topology, names: Iterable[str]) -> Topology:
    """The topology with only these tasks (in their order)."""
    keep = set(names)
    return _with_tasks(topology, [t for t in topology.tasks if t.name in keep])


def _required(topology: Topology, name: str) -> list[str]:
    """A task and the tasks it depends on (transitively), in the topology's order."""
    need, stack = set(), [name]
    while stack:
        t = stack.pop()
        if t not in need:
            need.add(t)
            stack.extend(topology.task(t).depends_on)
    return [t.name for t in topology.tasks if t.name in need]


class _Checker:
    """Runs the checks of a topology's tasks on one sample, sharing (and caching) the driver runs."""

    def __init__(self, topology: Topology, events: Iterable[Any] | None, seed: int = 0):
        self.topology = topology
        self.seed = seed
        self._events_in = events
        self._runs: dict[tuple[Any, ...], _Run] = {}
        self._results: dict[str, dict[str, CheckResult]] = {}
        self._validators = {src: EventValidator(topology, src) for src in topology.sources}

    @cached_property
    def events(self) -> list[Any]:
        if self._events_in is None:
            return synthetic_events(self.topology, DEFAULT_SAMPLE, self.seed)
        return list(self._events_in)

    def _source_events(self, name: str) -> Iterable[tuple[dict[str, Any], dict[str, Any]]]:
        """``(item, event)`` for each sample event of the task's source that passes validation
        (the only ones a predicate or the model ever sees); ``event`` without ``"_source"``."""
        task = self.topology.task(name)
        for item in self.events:
            if not isinstance(item, Mapping) or "_label" in item:
                continue
            src = str(item.get("_source") or self.topology.sources[0])
            if task.source is not None and src != task.source:
                continue
            event = {k: v for k, v in item.items() if k != "_source"}
            if src in self._validators and self._validators[src].check(event) is None:
                yield dict(item), event

    # -- runs --------------------------------------------------------------------------------------
    def run(self, names: list[str], variant: str = "sample", cache: bool = True) -> _Run:
        key = (tuple(names), variant)
        if cache and key in self._runs:
            return self._runs[key]
        topology = _subset(self.topology, names)
        events = self.events
        if variant == "no_augment":  # the last task's augmentation stripped
            tasks = [t.model_copy(update={"augment": []}) if t.name == names[-1] else t for t in topology.tasks]
            topology = _with_tasks(topology, tasks)
        elif variant.startswith("malformed:"):
            events = self._with_malformed(variant.split(":", 1)[1])
        run = self._drive(topology, events)
        if cache:
            self._runs[key] = run
        return run

    def _drive(self, topology: Topology, events: list[Any]) -> _Run:
        run = _Run([t.name for t in topology.tasks])
        late = {t.name for t in topology.tasks if t.label_ttl_s is not None}
        events = [  # the late labels of tasks that are not in this run have nobody to go to
            e
            for e in events
            if not (isinstance(e, Mapping) and isinstance(e.get("_label"), Mapping)) or e["_label"].get("task") in late
        ]
        with TopologyDriver(topology, seed=self.seed) as driver:
            models = {group: s.trainer.model for group, s in driver.sessions.items()}
            before = {group: head_vectors(model) for group, model in models.items()}
            try:
                driver.pipe(events)
            except Exception as exc:
                run.error = _describe(exc)
            run.predictions, run.dead = driver.predictions(), driver.dlq()
            run.batches, run.losses, run.frames = driver.batches(), driver.losses(), driver.frames()
            for group, model in models.items():
                run.movement.update(head_movement(before[group], model))
            if run.error is None:
                try:
                    run.gradients = {group: self._gradients(driver, group) for group in driver.sessions}
                except Exception as exc:
                    run.error = _describe(exc)
        return run

    def _gradients(self, driver: TopologyDriver, group: str) -> TrunkGradients:
        """Trunk and head gradients of a group's trained model on (up to) the sample's labelled rows of its tasks."""
        session = driver.sessions[group]
        trainer = session.trainer
        late = {
            (lab["task"], str(lab["id"])): lab["value"]
            for item in self.events
            if isinstance(item, Mapping) and isinstance(lab := item.get("_label"), Mapping) and "id" in lab
        }
        xs, ys, blocks, start = [], [], {}, 0
        for name in (t.name for t in session.topology.tasks):
            rows_x, rows_y = [], []
            for batch in driver.frames(name):
                if batch.kind != "examples":
                    continue  # late labels: matched to their events' rows from the sample below
                for i, eid in enumerate(batch.ids):
                    y = batch.y[i] if batch.y[i] is not None else late.get((name, eid))
                    if y is not None and len(rows_y) < DIAGNOSTIC_ROWS:
                        rows_x.append(batch.x[i])
                        rows_y.append(y)
            if not rows_y:
                continue
            y = trainer._targets(name, rows_y)
            xs.append(np.stack(rows_x).astype(np.float32))
            ys.append(np.pad(y, ((0, 0), (0, trainer.k_max - y.shape[1]))))
            blocks[name] = (start, start + len(rows_y))
            start += len(rows_y)
        if not blocks:
            return TrunkGradients()
        x = torch.from_numpy(np.concatenate(xs)).to(trainer.device)
        y = torch.from_numpy(np.concatenate(ys)).to(trainer.device)
        trainer.model.eval()
        return trunk_gradients(trainer.model, x, y, blocks, trainer.task_weights)

    def _template(self, name: str) -> dict[str, Any] | None:
        """A valid event of the task's source that carries its label (or any valid one of its source)."""
        label = self.topology.task(name).label
        fallback = None
        for item, event in self._source_events(name):
            if event.get(label) is not None:
                return item
            fallback = fallback or item
        return fallback

    def _with_malformed(self, name: str) -> list[Any]:
        """The sample with, in its middle, an event whose label for this task has the wrong type
        (and, for a task with late labels, a late label with a wrong value)."""
        task = self.topology.task(name)
        template = self._template(name)
        events = list(self.events)
        if template is None:
            return events
        id_field = self.topology.schema.id_field
        bad = {**template, id_field: f"{template[id_field]}-malformed", task.label: "not-a-label"}
        extra: list[Any] = [bad]
        if task.label_ttl_s is not None:
            extra.append({"_label": {"id": f"{template[id_field]}-malformed", "task": name, "value": "not-a-label"}})
        mid = len(events) // 2
        return [*events[:mid], *extra, *events[mid:]]

    @cached_property
    def healthy(self) -> list[str]:
        """Tasks that run alone without an error (what the ``malformed`` check runs beside a task)."""
        tasks = [t.name for t in self.topology.tasks]
        return [t for t in tasks if self._where_error(t) is None and self._alone(t).error is None]

    def _alone(self, name: str) -> _Run:
        return self.run(_required(self.topology, name))

    def _where_error(self, name: str) -> str | None:
        task = self.topology.task(name)
        if task.where is None:
            return None
        id_field = self.topology.schema.id_field
        for _item, event in self._source_events(name):  # an invalid event is dead-lettered before any predicate
            try:
                task.where(event)
            except Exception as exc:
                return f"where= raised on event {event.get(id_field)!r}: {_describe(exc)}"
        return None

    # -- the checks ----------------------------------------------------------------------------------
    def results(self, name: str) -> list[CheckResult]:
        """Every check of one task (computed once)."""
        self.topology.task(name)  # KeyError for an unknown task
        if name not in self._results:
            stopped = name not in self.healthy  # its predicate or the pipeline raised: nothing more to learn
            self._results[name] = {
                c: CheckResult(name, c, False, "not run: the task stops the pipeline (see runs)")
                if stopped and c in _NEEDS_A_RUN
                else CheckResult(name, c, *getattr(self, f"_check_{c}")(name))
                for c in CHECKS
            }
        return list(self._results[name].values())

    def result(self, name: str, check: str) -> CheckResult:
        if check not in CHECKS:
            raise KeyError(f"unknown check {check!r} (checks: {', '.join(CHECKS)})")
        self.results(name)
        return self._results[name][check]

    def _check_runs(self, name: str) -> tuple[bool, str]:
        where = self._where_error(name)
        if where is not None:
            return False, where
        run = self._alone(name)
        if run.error is not None:
            return False, f"the pipeline stopped: {run.error}"
        n = sum(1 for r in run.predictions if r["task"] == name)
        if n == 0:
            return False, "no event of the sample reaches it (its source, where= or label filter out every one)"
        learned = sum(b.get(name, 0) for b in run.batches)
        return True, f"{n} predictions, {learned} rows learned"

    def _check_deterministic(self, name: str) -> tuple[bool, str]:
        first, second = self._alone(name), self.run(_required(self.topology, name), cache=False)
        if first.error or second.error:
            return False, f"the pipeline stopped: {first.error or second.error}"
        if len(first.frames) != len(second.frames) or any(
            a.ids != b.ids
            or a.y != b.y
            or not np.array_equal(a.x, b.x)
            or (a.x_train is None) != (b.x_train is None)
            or (a.x_train is not None and not np.array_equal(a.x_train, b.x_train))
            for a, b in zip(first.frames, second.frames, strict=False)
        ):
            return False, "the task frames (features, routing, text augmentation) differ between two runs"
        for a, b in zip(first.predictions, second.predictions, strict=False):
            if a != b:
                return False, f"predictions differ between two runs, first at event {a['id']!r} ({a['task']})"
        if len(first.predictions) != len(second.predictions):
            return False, "the two runs made different numbers of predictions"
        if first.batches != second.batches or first.losses != second.losses:
            return False, "the training batches or losses differ between two runs"
        return True, f"{len(first.predictions)} predictions and {len(first.losses)} steps repeat exactly"

    def _check_labels(self, name: str) -> tuple[bool, str]:
        task = self.topology.task(name)
        validator = EventValidator(self.topology)
        id_field = self.topology.schema.id_field
        n, bad = 0, []
        for item in self.events:
            if not isinstance(item, Mapping):
                continue
            lab = item.get("_label")
            if isinstance(lab, Mapping):
                if lab.get("task") != name or lab.get("value") is None:
                    continue
                eid, value = lab.get("id"), lab["value"]
            else:
                if task.source is not None and str(item.get("_source") or self.topology.sources[0]) != task.source:
                    continue
                if item.get(task.label) is None:
                    continue
                eid, value = item.get(id_field), item[task.label]
            n += 1
            reason = validator.check_label(task.label, value)
            if reason is not None:
                bad.append(f"event {eid!r}: {reason}")
        if bad:
            return False, f"{len(bad)} of {n} labels have the wrong type; first: {bad[0]}"
        if n == 0:
            return False, f"no event of the sample carries its label {task.label!r} (nor a late label): it cannot learn"
        return True, f"{n} labels of kind {task.kind}"

    def _check_augmentation(self, name: str) -> tuple[bool, str]:
        task = self.topology.task(name)
        if not task.augment:
            return True, "no augmentation declared"
        names = _required(self.topology, name)
        names = [*(n for n in names if n != name), name]  # the variant strips the last task's augmentation
        with_aug, without = self.run(names), self.run(names, variant="no_augment")
        if with_aug.error or without.error:
            return False, f"the pipeline stopped: {with_aug.error or without.error}"
        fa = [b for b in with_aug.frames if b.task == name]
        fb = [b for b in without.frames if b.task == name]
        if len(fa) != len(fb) or any(
            a.ids != b.ids or not np.array_equal(a.x, b.x) for a, b in zip(fa, fb, strict=False)
        ):
            return False, "augmentation changed the inputs that are predicted (the frames' x), not only training copies"

        def before_training(run: _Run) -> list[tuple[Any, ...]]:
            return [
                (r["id"], r["prediction"], r["score"])
                for r in run.predictions
                if r["task"] == name and r["model_version"].endswith("-0")
            ]

        pa, pb = before_training(with_aug), before_training(without)
        if pa != pb:
            return False, "predictions made before any training differ with and without augmentation"
        copies = sum(1 for b in fa if b.x_train is not None)
        extra = sum(b.get(name, 0) for b in with_aug.batches) - sum(b.get(name, 0) for b in without.batches)
        kinds = ", ".join(sorted({a.kind for a in task.augment}))
        return True, (
            f"{kinds}: {len(pa)} predictions before training identical; {copies} frames with training copies"
            + (f"; {extra:+d} training rows" if extra else "")
        )

    def _check_malformed(self, name: str) -> tuple[bool, str]:
        task = self.topology.task(name)
        template = self._template(name)
        if template is None:
            return False, "the sample has no valid event of its source to corrupt"
        keep = {*self.healthy, *_required(self.topology, name)}
        names = [t.name for t in self.topology.tasks if t.name in keep]
        base, bad = self.run(names), self.run(names, variant=f"malformed:{name}")
        if bad.error is not None:
            return False, f"the pipeline stopped on the malformed event: {bad.error}"
        if base.error is not None:
            return False, f"the pipeline stopped on the sample: {base.error}"
        bad_id = f"{template[self.topology.schema.id_field]}-malformed"
        dead = [d for d in bad.dead if d.key == bad_id.encode()]
        if not dead:
            return False, f"the event with a malformed {task.label!r} did not reach the DLQ"
        letter = next((d for d in dead if d.stage != "labels"), dead[0])
        if not letter.reason or task.label not in letter.reason:
            return False, f"its dead letter does not name the field {task.label!r} (reason: {letter.reason!r})"
        if task.label_ttl_s is not None and not any(d.stage == "labels" for d in dead):
            return False, "the malformed late label did not reach the DLQ"
        if any(r["id"] == bad_id for r in bad.predictions):
            return False, "the malformed event was predicted"
        seen = {(r["task"], r["id"]) for r in bad.predictions}
        want = {(r["task"], r["id"]) for r in base.predictions}
        if seen != want:
            lost = sorted({t for t, _ in want - seen})
            return False, f"other events stopped being predicted (tasks {', '.join(lost) or '?'})"
        others = len(names) - 1
        return True, f"dead-lettered ({letter.stage}: {letter.reason}); {others} other tasks went on"

    def _check_gradient(self, name: str) -> tuple[bool, str]:
        run = self._alone(name)
        if run.error is not None:
            return False, f"the pipeline stopped: {run.error}"
        steps = sum(1 for b in run.batches if b.get(name))
        if steps == 0:
            return False, "no training step included it"
        norm = run.head_norm(name)
        if norm is None:
            return False, f"its loss does not reach its head: no gradient flows into heads.{name}"
        if not math.isfinite(norm) or norm == 0:
            return False, f"its head's gradient is {norm:g}"
        moved = run.movement.get(name, 0.0)
        if moved == 0:
            return False, f"its head's parameters did not change in {steps} training steps"
        return True, f"head gradient norm {norm:.3g}; head moved {moved:.1%} in {steps} steps"

    def _check_finite_loss(self, name: str) -> tuple[bool, str]:
        run = self._alone(name)
        if run.error is not None:
            return False, f"the pipeline stopped: {run.error}"
        losses = [(i + 1, step[name]) for i, step in enumerate(run.losses) if name in step]
        if not losses:
            return False, "no training step included it"
        for step, value in losses:
            if not math.isfinite(value):
                return False, f"its loss is {value} at step {step}"
        for r in run.predictions:
            if r["task"] == name and not all(math.isfinite(s) for s in np.ravel(r["score"])):
                return False, f"prediction score of event {r['id']!r} is not finite"
        return True, f"{len(losses)} losses, last {losses[-1][1]:.4g}"

    # -- the whole topology --------------------------------------------------------------------------
    def report(self) -> TopologyReport:
        results = {t.name: self.results(t.name) for t in self.topology.tasks}
        healthy = self.healthy
        run = self.run(healthy) if healthy else None
        return TopologyReport(
            self.topology,
            results,
            run.gradients if run is not None else {},
            run.movement if run is not None else {},
            sum(1 for e in self.events if not (isinstance(e, Mapping) and "_label" in e)),
            sum(1 for e in self.events if isinstance(e, Mapping) and "_label" in e),
            run.error if run is not None else "no task runs",
        )
