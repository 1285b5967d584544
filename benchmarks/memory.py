"""Bounded memory: the RSS of a real worker process after 100k and after 1M events.

A ``stream-mtl worker`` subprocess runs the synthetic topology on the embedded broker; this
process streams the events in chunks (never holding them all) and samples the worker's RSS (its
own plus its trainer process's) from ``/proc`` when its metrics say it has processed 100k, 250k,
500k and 1M events. Usage::

    .venv/bin/python benchmarks/memory.py [--events 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stream_mtl.broker import EmbeddedBroker  # noqa: E402
from stream_mtl.demo import MetricsFollower  # noqa: E402
from stream_mtl.topics import TopicNames, create_topics  # noqa: E402
from stream_mtl.topology import load_producer, load_topology  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def stream_events(bootstrap: str, names: TopicNames, n: int) -> None:
    """The synthetic stream, late labels to the labels topic, in chunks (never all in memory)."""
    from aiokafka import AIOKafkaProducer

    os.environ["STREAM_MTL_SYNTHETIC_EVENTS"] = str(n)
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=10, max_batch_size=512 * 1024)
    await p.start()
    try:
        pending = []
        for ev in load_producer("synthetic")():
            label = ev.get("_label")
            if label is not None:
                pending.append(await p.send(names.labels, orjson.dumps(label), key=label["id"].encode()))
            else:
                pending.append(await p.send(names.source, orjson.dumps(ev), key=ev["id"].encode()))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await p.stop()


async def run(n: int, marks: list[int]) -> dict[str, float]:
    topo = load_topology("synthetic")
    names = TopicNames(topo)
    samples: dict[int, float] = {}
    async with EmbeddedBroker() as broker:
        await create_topics(broker.bootstrap, names.all())
        worker = subprocess.Popen(
            [sys.executable, "-m", "stream_mtl", "worker", "--topology", "synthetic", "--broker", broker.url,
             "--session-timeout", "2"],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            env={**os.environ, "STREAM_MTL_DATA_DIR": tempfile.mkdtemp()},  # no earlier checkpoint
        )  # fmt: skip
        follower = MetricsFollower(broker.bootstrap, names.metrics)
        await follower.start()
        producer = asyncio.create_task(stream_events(broker.bootstrap, names, n))
        t0 = time.time()
        try:
            todo = sorted(marks)
            while todo:
                if worker.poll() is not None:
                    raise RuntimeError(f"worker exited with {worker.returncode}")
                snap = await follower.poll(200)
                predicted = max(snap["predicted"].values()) if snap else 0  # events through the trainer
                if snap and predicted >= todo[0]:
                    mark = todo.pop(0)
                    # the worker and its trainer process (forked: shared pages count twice, an upper bound)
                    trainer = snap.get("trainer_pid")
                    own, child = rss_mib(worker.pid), (rss_mib(trainer) if trainer else 0.0)
                    samples[mark] = own + child
                    el = time.time() - t0
                    rss = samples[mark]
                    lab = snap.get("labels", {}).get("r0", {})
                    print(
                        f"  {snap['events']:>9,} ingested {predicted:>9,} predicted  RSS {rss:7.1f} MiB "
                        f"(worker {own:.1f} + trainer {child:.1f})  {el:.0f} s"
                        f"  late r0 labels: {lab.get('joined', 0):,} joined, {lab.get('pending', 0):,} pending"
                    )
            await producer
        finally:
            await follower.stop()
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    args = ap.parse_args()
    n = args.events
    marks = sorted({m for m in (100_000, 250_000, 500_000, n) if m <= n})
    print(f"worker RSS, synthetic topology (4 tasks, sparse r0 with late labels), {n:,} events on the embedded broker:")
    samples = asyncio.run(run(n, marks))
    first, last = samples[marks[0]], samples[marks[-1]]
    growth = (last - first) / first
    print(f"\n{'events':>10} {'RSS MiB':>9}")
    for m in marks:
        print(f"{m:>10,} {samples[m]:>9.1f}")
    print(f"growth {marks[0]:,} → {marks[-1]:,}: {growth * 100:+.1f} %")
    print(
        orjson.dumps(
            {"rss_mib": {str(k): round(v, 1) for k, v in samples.items()}, "growth": round(growth, 4)}
        ).decode()
    )


if __name__ == "__main__":
    main()
