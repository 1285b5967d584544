"""Prequential quality on river's Yeast stream: stream_mtl settings against River baselines, one run.

Single pass, predict-then-learn, the same 2,417 events in the same order for everyone:

- stream_mtl, in process (the worker's own ``IngestStage`` and ``Trainer``, no broker), with
  several sampler / loss-balancer settings of the Yeast topology;
- River ``ClassifierChain(LogisticRegression)`` and one River ``LogisticRegression`` per label.

Prints micro-F1 and events/s for each, then one JSON line
``{"stream_mtl_micro_f1", "river_best_micro_f1", "stream_mtl_events_per_s", "river_events_per_s"}``
(stream_mtl: its best setting; River: its best model). Usage::

    .venv/bin/python benchmarks/quality.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import orjson
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stream_mtl.pipeline import IngestStage  # noqa: E402
from stream_mtl.topology import BalancerSpec, SamplerSpec, Topology, load_producer, load_topology  # noqa: E402
from stream_mtl.trainer import Trainer  # noqa: E402


class _Rec:
    __slots__ = ("key", "offset", "partition", "topic", "value")

    def __init__(self, topic: str, offset: int, value: bytes):
        self.topic, self.partition, self.offset, self.key, self.value = topic, 0, offset, None, value


def run_stream_mtl(topo: Topology, events: list[dict[str, Any]]) -> tuple[float, float]:
    """The pipeline's ingest stage and trainer over the events, one poll of ``ingest_batch`` at a time."""
    torch.manual_seed(0)
    topic = f"{topo.name}.events"
    stage = IngestStage(topo, {topic: "events"})
    trainer = Trainer(topo, device="cpu")
    payloads = [orjson.dumps(e) for e in events]
    t0 = time.perf_counter()
    for start in range(0, len(payloads), topo.ingest_batch):
        recs = [_Rec(topic, start + i, v) for i, v in enumerate(payloads[start : start + topo.ingest_batch])]
        for batch in stage.process({0: recs}).batches:
            trainer.observe(batch)  # predict first …
        trainer.train()  # … then learn from the whole poll (the agent's "round")
    el = time.perf_counter() - t0
    return float(trainer.snapshot()["micro_f1"] or 0.0), len(events) / el


def run_river(model: Any, rows: list[tuple[dict[str, float], dict[str, bool]]]) -> tuple[float, float]:
    from river import metrics

    f1 = metrics.multioutput.MicroAverage(metrics.F1())
    t0 = time.perf_counter()
    for x, y in rows:
        f1.update(y, model.predict_one(x))
        model.learn_one(x, y)
    el = time.perf_counter() - t0
    return float(f1.get()), len(rows) / el


class PerLabel:
    """One River LogisticRegression per label (binary relevance)."""

    def __init__(self, labels: list[str]):
        from river import linear_model, preprocessing

        self.models = {lab: preprocessing.StandardScaler() | linear_model.LogisticRegression() for lab in labels}

    def predict_one(self, x: dict[str, float]) -> dict[str, bool]:
        return {lab: bool(m.predict_one(x)) for lab, m in self.models.items()}

    def learn_one(self, x: dict[str, float], y: dict[str, bool]) -> None:
        for lab, m in self.models.items():
            m.learn_one(x, y[lab])


def main() -> dict[str, Any]:
    from river import datasets, linear_model, multioutput, preprocessing

    torch.set_num_threads(1)
    base = load_topology("yeast")
    events = list(load_producer("yeast")())
    settings = {
        "proportional, static weights (the yeast topology)": base,
        "temperature T=2, uncertainty weighting": base.model_copy(
            update={
                "sampler": SamplerSpec(kind="temperature", temperature=2.0),
                "model": base.model.model_copy(update={"balancer": BalancerSpec(kind="uncertainty")}),
            }
        ),
        "proportional, DWA": base.model_copy(
            update={"model": base.model.model_copy(update={"balancer": BalancerSpec(kind="dwa")})}
        ),
        "proportional, replay 25 %": base.model_copy(update={"sampler": SamplerSpec(replay_share=0.25)}),
        "proportional, static, trunk [256, 256], steps of 16 at lr 1e-3 (session 2)": base.model_copy(
            update={"batch_size": 16, "model": base.model.model_copy(update={"trunk": [256, 256], "lr": 1e-3})}
        ),
        "proportional, static, polls of 500": base.model_copy(update={"ingest_batch": 500}),
    }
    results: dict[str, tuple[float, float]] = {}
    run_stream_mtl(base, events[:300])  # warm-up: torch's first calls are slow (River has none to pay)
    for name, topo in settings.items():
        results[f"stream_mtl: {name}"] = run_stream_mtl(topo, events)
    rows = [(x, {k: bool(v) for k, v in y.items()}) for x, y in datasets.Yeast()]
    labels = list(rows[0][1])
    chain = multioutput.ClassifierChain(
        model=preprocessing.StandardScaler() | linear_model.LogisticRegression(), order=labels
    )
    river = {
        "River ClassifierChain(LogisticRegression)": run_river(chain, rows),
        "River LogisticRegression per label": run_river(PerLabel(labels), rows),
    }
    results.update(river)

    print(f"\nYeast, {len(events):,} events, single pass, prequential (predict, then learn)\n")
    print(f"{'model':<66} {'micro-F1':>9} {'events/s':>10}")
    print("-" * 87)
    for name, (f1, rate) in results.items():
        print(f"{name:<66} {f1:>9.4f} {rate:>10,.0f}")
    ours = {k: v for k, v in results.items() if k.startswith("stream_mtl")}
    best_ours = max(ours.values(), key=lambda v: v[0])
    best_river = max(river.values(), key=lambda v: v[0])
    out = {
        "stream_mtl_micro_f1": round(best_ours[0], 4),
        "river_best_micro_f1": round(best_river[0], 4),
        "stream_mtl_events_per_s": round(best_ours[1], 1),
        "river_events_per_s": round(best_river[1], 1),
        "speed_ratio": round(best_ours[1] / best_river[1], 2),
    }
    print()
    print(orjson.dumps(out).decode())
    return out


if __name__ == "__main__":
    main()
