"""Shared fixtures: the embedded broker (session-scoped) and real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_mtl.broker import EmbeddedBroker

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A Tansu broker on a free loopback port for the whole test session."""
    with EmbeddedBroker(log_dir=tmp_path_factory.mktemp("broker")) as b:
        yield b


class WorkerProcess:
    """A ``stream-mtl worker`` subprocess with its own app id (topic prefix)."""

    def __init__(
        self,
        topology: str,
        broker: EmbeddedBroker,
        log_path: Path,
        app_id: str | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ):
        self.app_id = app_id or f"t{uuid.uuid4().hex[:8]}"
        self._stopped = False
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stream_mtl",
                "worker",
                "--topology",
                topology,
                "--broker",
                broker.url,
                "--app-id",
                self.app_id,
                "--session-timeout",
                "2",
                "--log-level",
                "INFO",
                *args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            # one data dir per test: workers of one test share checkpoints, tests do not
            env={
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                "STREAM_MTL_DATA_DIR": str(log_path.parent / "data"),
                **(env or {}),
            },
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def died(self) -> bool:
        """Exited on its own (not stopped by the test) with a failure status."""
        return not self._stopped and self.proc.poll() not in (None, 0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self._stopped = True
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def start_worker(broker: EmbeddedBroker, tmp_path: Path) -> Iterator:
    """Factory: ``start_worker("yeast")`` → a running :class:`WorkerProcess`; stopped afterwards."""
    workers: list[WorkerProcess] = []

    def start(
        topology: str, app_id: str | None = None, args: tuple[str, ...] = (), env: dict[str, str] | None = None
    ) -> WorkerProcess:
        w = WorkerProcess(topology, broker, tmp_path / f"worker-{len(workers)}.log", app_id, args, env)
        workers.append(w)
        return w

    yield start
    for w in workers:
        if w.died():  # a worker that crashed on its own: show why (pytest prints this with the failure)
            print(f"--- worker {w.proc.pid} exited {w.proc.returncode}; last lines of {w.log_path}:")
            print("\n".join(w.log().splitlines()[-60:]))
        w.stop()
