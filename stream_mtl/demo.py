"""``stream-mtl demo``: embedded broker + worker process + producer, live progress, a report.

The worker runs as a real ``stream-mtl worker`` subprocess; this process produces the data
set, follows the worker's ``<app>.metrics`` topic for live progress, and stops the worker
(SIGTERM) once every labelled example has been predicted and every malformed record is in
the dead-letter topic. It writes ``<run_dir>/metrics.json`` and ``<run_dir>/report.md``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.live import Live
from rich.table import Table

from stream_mtl.app import write_json_atomic
from stream_mtl.broker import EmbeddedBroker, parse_broker_url
from stream_mtl.produce import ProduceReport, produce_events
from stream_mtl.run_report import write_report
from stream_mtl.topics import TopicNames, create_topics
from stream_mtl.topology import load_producer, load_topology, resolve_topology_path

__all__ = ["MetricsFollower", "run_demo", "summary"]


class MetricsFollower:
    """Follows ``<app>.metrics`` (no consumer group) and keeps the latest snapshot."""

    def __init__(self, bootstrap: str, topic: str):
        self.bootstrap = bootstrap
        self.topic = topic
        self.latest: dict[str, Any] | None = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await self._consumer.start()
        self._consumer.assign([TopicPartition(self.topic, 0)])
        await self._consumer.seek_to_beginning()

    async def poll(self, timeout_ms: int = 500) -> dict[str, Any] | None:
        data = await self._consumer.getmany(timeout_ms=timeout_ms)
        for recs in data.values():
            for r in recs:
                self.latest = orjson.loads(r.value)
        return self.latest

    async def stop(self) -> None:
        await self._consumer.stop()


def summary(snap: dict[str, Any]) -> dict[str, Any]:
    """The report's metrics: ``{"events", "dlq", "tasks": {name: {metric: value}}, "micro_f1"}``."""
    out = {"events": snap["events"], "dlq": snap["dlq"], "tasks": snap["tasks"]}
    if snap.get("micro_f1") is not None:
        out["micro_f1"] = snap["micro_f1"]
    out["model_version"] = snap.get("model_version")
    out["steps"] = snap.get("steps")
    return out


def _table(snap: dict[str, Any] | None, title: str) -> Table:
    table = Table(title=title)
    table.add_column("task")
    if not snap:
        return table
    metric_names = sorted({k for v in snap["tasks"].values() for k in v if k != "n"})
    for m in metric_names:
        table.add_column(m, justify="right")
    table.add_column("n", justify="right")
    for name, vals in snap["tasks"].items():
        table.add_row(name, *[f"{vals.get(m, float('nan')):.3f}" for m in metric_names], str(vals.get("n", 0)))
    return table


def _progress_line(snap: dict[str, Any] | None, expected: int) -> str:
    if not snap:
        return "waiting for the worker …"
    el = max(snap["ts"] - (snap.get("first_event_at") or snap["ts"]), 1e-3)  # since the worker's first event
    mf = snap.get("micro_f1")
    mf_s = f" micro-F1 {mf:.3f}" if mf is not None else ""
    return (
        f"events {snap['events']}/{expected}  dlq {snap['dlq']}  steps {snap['steps']}  "
        f"{snap['events'] / el:,.0f} events/s{mf_s}"
    )


def _report_md(name: str, snap: dict[str, Any], elapsed: float, startup: float | None) -> str:
    lines = [f"# stream_mtl demo: {name}", "", f"- events: {snap['events']}", f"- dead letters: {snap['dlq']}"]
    if snap.get("micro_f1") is not None:
        lines.append(f"- micro-F1 (prequential): {snap['micro_f1']:.4f}")
    lines.append(f"- wall time: {elapsed:.1f} s")
    if startup is not None:
        lines.append(f"- worker start → first event: {startup:.2f} s")
    lines += ["", "| task | " + " | ".join(k for k in next(iter(snap["tasks"].values()))) + " |"]
    lines.append("|" + "---|" * (1 + len(next(iter(snap["tasks"].values())))))
    for t, vals in snap["tasks"].items():
        lines.append(
            f"| {t} | " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in vals.values()) + " |"
        )
    return "\n".join(lines) + "\n"


def run_demo(
    topology_ref: str,
    broker: str | None = None,
    malformed: int = 5,
    run_dir: Path = Path("runs/latest"),
    timeout: float = 600.0,
    limit: int | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the whole job; returns the final summary (also written to ``run_dir``)."""
    console = console or Console()
    topology = load_topology(topology_ref)
    path = resolve_topology_path(topology_ref)
    names = TopicNames(topology)
    with ExitStack() as stack:
        if broker is None:
            emb = stack.enter_context(EmbeddedBroker(log_dir=run_dir))
            url = emb.url
            console.print(f"[bold]embedded broker[/] (Tansu) on {emb.bootstrap}")
        else:
            url = broker
        bootstrap = parse_broker_url(url)
        asyncio.run(create_topics(bootstrap, names.all()))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # this run's history only
        data_dir = run_dir / "data"  # the worker's checkpoints: a fresh embedded broker means a fresh model
        if broker is None:
            shutil.rmtree(data_dir, ignore_errors=True)
        worker_log = open(run_dir / "worker.log", "wb")  # noqa: SIM115
        stack.callback(worker_log.close)
        t_start = time.time()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stream_mtl",
                "worker",
                "--topology",
                str(path),
                "--broker",
                url,
                "--run-dir",
                str(run_dir),
            ],
            env={
                **os.environ,
                "STREAM_MTL_SESSION_TIMEOUT": os.environ.get("STREAM_MTL_SESSION_TIMEOUT", "2"),
                "STREAM_MTL_DATA_DIR": os.environ.get("STREAM_MTL_DATA_DIR", str(data_dir)),
            },
            stdout=worker_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        stack.callback(_stop_worker, proc)
        console.print(f"worker pid {proc.pid} (log: {run_dir / 'worker.log'})")
        snap, report = asyncio.run(
            _produce_and_follow(bootstrap, names, topology, path, malformed, limit, timeout, console, proc)
        )
        elapsed = time.time() - t_start
        _stop_worker(proc)
    startup = (snap["first_event_at"] - snap["started_at"]) if snap.get("first_event_at") else None
    result = summary(snap)
    write_json_atomic(run_dir / "metrics.json", result)
    (run_dir / "report.md").write_text(_report_md(topology.name, snap, elapsed, startup))
    console.print(_table(snap, f"{topology.name}: per-task prequential metrics"))
    mf = f"{snap['micro_f1']:.4f}" if snap.get("micro_f1") is not None else "n/a"
    console.print(
        f"[bold green]done[/]: {snap['events']} events, {snap['dlq']} dead letters "
        f"(sent {report.malformed}), micro-F1 {mf}, {elapsed:.1f} s; "
        + (f"worker start → first event {startup:.2f} s" if startup is not None else "start-up time unknown")
    )
    html = write_report(run_dir, {t.name: t.kind for t in topology.tasks})
    console.print(f"report: {run_dir / 'report.md'}, {html}; metrics: {run_dir / 'metrics.json'}")
    return result


def _stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def _produce_and_follow(
    bootstrap: str,
    names: TopicNames,
    topology: Any,
    path: Path,
    malformed: int,
    limit: int | None,
    timeout: float,
    console: Console,
    proc: subprocess.Popen[bytes],
) -> tuple[dict[str, Any], ProduceReport]:
    follower = MetricsFollower(bootstrap, names.metrics)
    await follower.start()
    try:
        events = load_producer(path)()
        report = await produce_events(bootstrap, names, events, malformed=malformed, limit=limit)
        late = f", {report.labels} late labels to {names.labels}" if report.labels else ""
        console.print(
            f"produced {report.events} events and {report.malformed} malformed records to "
            f"{', '.join(names.sources)}{late}"
        )
        deadline = time.time() + timeout
        snap = None
        interactive = console.is_terminal
        last_line = 0.0
        with Live(console=console, refresh_per_second=4, transient=True) if interactive else _Null() as live:
            while time.time() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.returncode}; see its log")
                snap = await follower.poll()
                line = _progress_line(snap, report.events)
                if interactive:
                    live.update(_table(snap, line))
                elif time.time() - last_line > 2:
                    console.print(line)
                    last_line = time.time()
                if snap and _finished(snap, report):
                    return snap, report
        raise TimeoutError(f"demo did not finish within {timeout}s (last: {_progress_line(snap, report.events)})")
    finally:
        await follower.stop()


def _finished(snap: dict[str, Any], report: ProduceReport) -> bool:
    done = all(snap["predicted"].get(t, 0) >= n for t, n in report.labelled.items())
    return done and snap["dlq"] >= report.malformed and snap["pending"] == 0


class _Null:
    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *a: object) -> None:
        return None
