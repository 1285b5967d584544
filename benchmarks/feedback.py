"""Drift feedback: the same drifting stream with and without the feedback loop, one run.

The drift topology's concept changes at event ``DRIFT_AT`` (every task's weights). Each setting
runs the worker's own ``IngestStage`` and ``TrainerSession`` in process (no broker): predict,
then learn, detectors on the prequential error, actions when they fire. Per task it prints how
many events after the drift the rolling accuracy (last 500 events) took to be back at 90 % of its
level just before the drift, and ends with one JSON line. Usage::

    .venv/bin/python benchmarks/feedback.py [--events 60000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stream_mtl.checkpoint import CheckpointStore  # noqa: E402
from stream_mtl.codec import PredictionBatch, encode_batch  # noqa: E402
from stream_mtl.pipeline import IngestStage  # noqa: E402
from stream_mtl.topology import Topology, load_topology  # noqa: E402
from stream_mtl.trainer_host import TrainerSession  # noqa: E402
from topologies.drift.topology import DRIFT_AT, STREAM  # noqa: E402

WINDOW = 500


class _Rec:
    __slots__ = ("key", "offset", "partition", "topic", "value")

    def __init__(self, topic: str, offset: int, value: bytes):
        self.topic, self.partition, self.offset, self.key, self.value = topic, 0, offset, None, value


def with_actions(topo: Topology, actions: list[str]) -> Topology:
    spec = topo.tasks[0].drift.model_copy(update={"actions": actions})
    return topo.model_copy(update={"tasks": [t.model_copy(update={"drift": spec}) for t in topo.tasks]})


def run(topo: Topology, events: list[dict[str, Any]]) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Per task, 1/0 per event (prediction right, in event order); the alerts raised."""
    torch.manual_seed(0)
    topic = f"{topo.name}.events"
    stage = IngestStage(topo, {topic: "events"})
    session = TrainerSession(topo, CheckpointStore(Path(tempfile.mkdtemp()), topo.spec_hash()), topo.name, "bench")
    truth = {t.name: {e["id"]: e[t.label] for e in events} for t in topo.tasks}
    right: dict[str, list[int]] = {t.name: [] for t in topo.tasks}
    alerts: list[dict[str, Any]] = []
    payloads = [orjson.dumps(e) for e in events]
    step = topo.ingest_batch
    for start in range(0, len(payloads), step):
        recs = [_Rec(topic, start + i, v) for i, v in enumerate(payloads[start : start + step])]
        frames = [encode_batch(b) for b in stage.process({0: recs}).batches]
        outputs, _changes, raised = session.process(frames)
        alerts += [orjson.loads(a) for a in raised]
        for task, preds, _n, _scores in outputs:  # type: ignore[misc]
            pb = PredictionBatch.from_json(preds)
            right[task] += [int(p == truth[task][i]) for i, p in zip(pb.ids, pb.predictions, strict=True)]
    return {t: np.asarray(v) for t, v in right.items()}, alerts


def recovery(right: np.ndarray, drift_at: int, window: int = WINDOW) -> tuple[float, int | None]:
    """Pre-drift rolling accuracy, and events after the drift until the rolling accuracy is ≥ 90 % of it."""
    roll = np.convolve(right, np.ones(window) / window, mode="valid")  # roll[i]: events i … i+window-1
    before = float(roll[drift_at - window])  # the window that ends just before the drift
    after = np.nonzero(roll[drift_at:] >= 0.9 * before)[0]  # windows starting at or after the drift
    return before, (int(after[0]) + window if len(after) else None)


def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=60_000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = load_topology("drift")
    events = list(STREAM.events(args.events))
    settings = {
        "no feedback (detectors only)": with_actions(base, []),
        "boost sampling + raise lr (the drift topology)": base,
        "raise lr": with_actions(base, ["raise_lr"]),
        "reset head": with_actions(base, ["reset_head"]),
    }
    rows: dict[str, dict[str, Any]] = {}
    for name, topo in settings.items():
        right, alerts = run(topo, events)
        per_task = {}
        for task, r in right.items():
            before, rec = recovery(r, DRIFT_AT)
            per_task[task] = {"pre_drift_accuracy": round(before, 4), "events_to_recover": rec}
        actions = sum(1 for a in alerts if a["kind"] == "action")
        rows[name] = {"tasks": per_task, "alerts": sum(1 for a in alerts if a["kind"] == "drift"), "actions": actions}

    tasks = list(next(iter(rows.values()))["tasks"])
    print(f"\n{args.events:,} events, drift at {DRIFT_AT:,}; events until the rolling accuracy ({WINDOW} events)")
    print("is back at 90 % of its pre-drift level, per task\n")
    print(f"{'setting':<48}" + "".join(f"{t:>10}" for t in tasks) + f"{'alerts':>8}{'actions':>9}")
    print("-" * (48 + 10 * len(tasks) + 17))
    for name, row in rows.items():
        cells = "".join(f"{row['tasks'][t]['events_to_recover'] or '–':>10}" for t in tasks)
        print(f"{name:<48}{cells}{row['alerts']:>8}{row['actions']:>9}")
    pre = {t: rows[next(iter(rows))]["tasks"][t]["pre_drift_accuracy"] for t in tasks}
    print(f"\npre-drift rolling accuracy: {pre}\n")
    without, with_ = rows["no feedback (detectors only)"], rows["boost sampling + raise lr (the drift topology)"]
    out = {
        "drift_at": DRIFT_AT,
        "events_to_recover_without_feedback": {t: without["tasks"][t]["events_to_recover"] for t in tasks},
        "events_to_recover_with_feedback": {t: with_["tasks"][t]["events_to_recover"] for t in tasks},
    }
    print(orjson.dumps(out).decode())
    return out


if __name__ == "__main__":
    main()
