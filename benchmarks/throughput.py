"""Throughput, side by side in one process and one run, over the same N events on one topic:

1. raw aiokafka ``getmany`` consumption (the input limit),
2. a bare Faust agent, one event per iteration (what a naive Faust pipeline pays per hop),
3. the full stream_mtl pipeline: ingest → validate → features → route → predict → learn.

Prints a table (with the pipeline's per-stage cost in µs per event), worker start-up times,
and ends with one JSON line. Usage::

    .venv/bin/python benchmarks/throughput.py [--events 200000] [--tasks 4]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stream_mtl.app import build_app
from stream_mtl.broker import EmbeddedBroker
from stream_mtl.settings import Settings
from stream_mtl.synthetic import SyntheticStream, synthetic_topology
from stream_mtl.topics import TopicNames, create_topics


async def produce(bootstrap: str, messages: list[tuple[str, bytes, bytes]]) -> float:
    """Send ``(topic, key, value)`` messages in order; returns messages per second."""
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=10, max_batch_size=512 * 1024)
    await p.start()
    t0 = time.perf_counter()
    futs = [await p.send(topic, v, key=k) for topic, k, v in messages]
    await p.flush()
    for f in futs:
        await f
    el = time.perf_counter() - t0
    await p.stop()
    return len(messages) / el


async def bench_raw(bootstrap: str, topic: str, n: int) -> float:
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await c.start()
    got, t0 = 0, None
    while got < n:
        data = await c.getmany(timeout_ms=500, max_records=10_000)
        for recs in data.values():
            if t0 is None:
                t0 = time.perf_counter()
            got += len(recs)
    el = time.perf_counter() - t0
    await c.stop()
    return n / el


async def bench_bare_faust(bootstrap: str, topic: str, n: int) -> tuple[float, float]:
    """A bare agent doing one orjson decode per event: Faust's own per-message cost."""
    import faust

    app = faust.App(
        "bench-bare",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        web_enabled=False,
        autodiscover=False,
        datadir="/tmp/stream_mtl/bench-bare",
        broker_session_timeout=2,
        broker_heartbeat_interval=0.5,
        broker_rebalance_timeout=4,
        consumer_auto_offset_reset="earliest",
        topic_allow_declare=False,
    )
    src = app.topic(topic, key_serializer="raw", value_serializer="raw")
    done = asyncio.Event()
    st: dict[str, float] = {}

    @app.agent(src)
    async def bare(stream: Any) -> None:
        count = 0
        async for value in stream:
            orjson.loads(value)
            if count == 0:
                st["first"] = time.perf_counter()
            count += 1
            if count >= n:
                st["last"] = time.perf_counter()
                done.set()

    t_start = time.perf_counter()
    await app.start()
    await asyncio.wait_for(done.wait(), 600)
    await app.stop()
    return n / (st["last"] - st["first"]), st["first"] - t_start


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench_pipeline(
    bootstrap: str, topo: Any, n: int, expected: dict[str, int], n_labels: int, broker_pid: int
) -> dict[str, Any]:
    """The worker's pipeline in this process; done when every prediction is out, every late
    label is accounted for (joined or expired) and the training buffers are drained."""
    # a fresh data dir: no checkpoint of an earlier run to resume from
    settings = Settings(broker=f"kafka://{bootstrap}", session_timeout=2, app_id="bench", data_dir=tempfile.mkdtemp())
    names = TopicNames(topo, settings.app_id)
    await create_topics(bootstrap, names.all())
    pipe = build_app(topo, settings)
    t_start = time.time()
    trainer_pid = pipe.trainer.pid or os.getpid()
    cpu0 = (cpu_seconds(os.getpid()), cpu_seconds(broker_pid), cpu_seconds(trainer_pid))
    await pipe.app.start()
    deadline = time.time() + 900
    while time.time() < deadline:
        status = pipe.trainer.status  # the trainer process's counters after its last call
        if (
            all(pipe.predicted[t] >= k for t, k in expected.items())
            and status["labels_settled"] >= n_labels
            and status["pending"] == 0
        ):
            break
        await asyncio.sleep(0.01)
    t_done = time.time()
    cpu1 = (cpu_seconds(os.getpid()), cpu_seconds(broker_pid), cpu_seconds(trainer_pid))
    ingest_done = pipe.last_event_at
    snap = await pipe.snapshot()
    await pipe.app.stop()
    el = t_done - snap["first_event_at"]
    return {
        "events_per_s": n / el,
        "elapsed": el,
        "startup_first_event": snap["first_event_at"] - t_start,
        "startup_first_prediction": snap["first_prediction_at"] - t_start,
        "timings": snap["timings_s"],
        "micro_f1": snap["micro_f1"],
        "late_joined": sum(c["joined"] for c in snap["labels"].values()),
        "steps": snap["steps"],
        "cpu_worker_s": cpu1[0] - cpu0[0],
        "cpu_broker_s": cpu1[1] - cpu0[1],
        "cpu_trainer_s": (cpu1[2] - cpu0[2]) if pipe.trainer.pid else float("nan"),
        "ingest_s": (ingest_done or t_done) - snap["first_event_at"],
    }


async def main(n: int, n_tasks: int, only_pipeline: bool = False, late: bool = True) -> dict[str, Any]:
    gen = SyntheticStream(
        n_features=16,
        n_binary=max(n_tasks - 1, 1),
        n_regression=1,
        missing={"r0": 0.5},
        late={"r0": 0.5} if late else None,
        seed=0,
    )
    topo = synthetic_topology(gen, name="bench", sources=["source"])
    names = TopicNames(topo, "bench")
    source = names.source  # all three read this topic
    items = list(gen.events(n))
    events = [e for e in items if "_label" not in e]
    # in stream order: a late label follows its event by ``late_after`` events, as in production
    messages = [
        (names.labels, e["_label"]["id"].encode(), orjson.dumps(e["_label"]))
        if "_label" in e
        else (source, e["id"].encode(), orjson.dumps(e))
        for e in items
    ]
    n_labels = sum(1 for m in messages if m[0] == names.labels)
    # predictions per task: every labelled event, and every event for a task that takes late labels
    expected = {
        t.name: sum(1 for e in events if e.get(t.label) is not None or t.label_ttl_s is not None) for t in topo.tasks
    }
    avg_bytes = sum(len(v) for t, _, v in messages if t == source) / n
    async with EmbeddedBroker() as broker:
        await create_topics(broker.bootstrap, {source: 1, names.labels: 1})
        prod_rate = await produce(broker.bootstrap, messages)
        # a worker does not hold the stream it consumes: free it, so that no consumer's garbage
        # collections walk half a million generated objects
        del items, events, messages
        gc.collect()
        if only_pipeline:  # for profiling the pipeline alone
            raw, bare, bare_start = float("nan"), float("nan"), float("nan")
        else:
            raw = await bench_raw(broker.bootstrap, source, n)
            bare, bare_start = await bench_bare_faust(broker.bootstrap, source, n)
        pipe = await bench_pipeline(broker.bootstrap, topo, n, expected, n_labels, broker.pid)

    rows = [
        ("producer (aiokafka send, + labels)", prod_rate),
        ("raw aiokafka getmany consume", raw),
        ("bare Faust agent, 1 event/iteration", bare),
        ("stream_mtl pipeline, end to end", pipe["events_per_s"]),
    ]
    late_txt = f", {n_labels:,} late labels on {names.labels}" if n_labels else ""
    print(
        f"\n{n:,} events, {avg_bytes:.0f} B each, {len(topo.tasks)} tasks{late_txt}, 1 partition, "
        "embedded Tansu broker\n"
    )
    print(f"{'what':<40} {'events/s':>12}")
    print("-" * 53)
    for name, rate in rows:
        print(f"{name:<40} {rate:>12,.0f}")
    print(f"\npipeline stages (µs per event, wall {pipe['elapsed']:.2f} s over {n:,} events):")
    total_us = pipe["elapsed"] * 1e6 / n
    accounted = 0.0
    for stage, secs in pipe["timings"].items():
        us = secs * 1e6 / n
        accounted += us
        print(f"  {stage:<22} {us:8.2f}")
    print(f"  {'framework + waiting':<22} {max(total_us - accounted, 0):8.2f}")
    print(f"  {'total':<22} {total_us:8.2f}")
    print(
        f"\nstart-up: bare Faust first event {bare_start:.2f} s; pipeline first event "
        f"{pipe['startup_first_event']:.2f} s, first prediction {pipe['startup_first_prediction']:.2f} s"
    )
    print(
        f"CPU during the pipeline run (incl. start-up): worker {pipe['cpu_worker_s']:.2f} s, its trainer process "
        f"{pipe['cpu_trainer_s']:.2f} s, broker {pipe['cpu_broker_s']:.2f} s, "
        f"wall {pipe['elapsed'] + pipe['startup_first_event']:.2f} s; ingest read the last event after "
        f"{pipe['ingest_s']:.2f} s of {pipe['elapsed']:.2f} s"
    )
    print(f"pipeline quality: micro-F1 {pipe['micro_f1']:.3f} over binary tasks, {pipe['steps']} train steps\n")
    result = {
        "pipeline_events_per_s": round(pipe["events_per_s"], 1),
        "bare_faust_events_per_s": round(bare, 1),
        "raw_consume_per_s": round(raw, 1),
        "ratio": round(pipe["events_per_s"] / bare, 3),
        "ratio_to_raw": round(pipe["events_per_s"] / raw, 3),
        "startup_first_event_s": round(pipe["startup_first_event"], 2),
        "late_labels": n_labels,
        "late_joined": pipe["late_joined"],
    }
    print(orjson.dumps(result).decode())
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--only-pipeline", action="store_true", help="skip the baselines (for profiling)")
    ap.add_argument("--no-late", action="store_true", help="every label on its event (no <app>.labels stream)")
    args = ap.parse_args()
    asyncio.run(main(args.events, args.tasks, args.only_pipeline, late=not args.no_late))
