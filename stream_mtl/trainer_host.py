"""Where a worker's model lives: in a child process of the worker (default) or in a thread of it.

Torch must not share a GIL with the event loop. In one process the trainer thread got a fraction
of it, and a round's training took 50–200 ms instead of ~10 ms while ingest waited for nothing
(``benchmarks/README.md``). So the :class:`TrainerSession` — model, optimiser, buffers, pending
labels, prequential metrics, checkpoints — runs in a child process forked when the worker starts,
before Faust starts its threads and before anything touches CUDA. The agents talk to it through
:class:`TrainerHost`, one call at a time and in order: frames go in as the bytes read from Kafka,
predictions come out as the bytes written to it. ``Settings.trainer_process=False`` runs the very
same session in a thread instead (one code path; only the transport differs).

The child ignores SIGINT/SIGTERM (the worker decides when to checkpoint and stop) and exits when
its pipe closes, so a worker that is SIGKILLed does not leave it behind.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import signal
import socket
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from stream_mtl.alerts import Alert, alert_id
from stream_mtl.checkpoint import CheckpointStore
from stream_mtl.codec import decode_batch
from stream_mtl.log import get_logger
from stream_mtl.topology import DriftSpec, Topology
from stream_mtl.trainer import Trainer

log = get_logger(__name__)

__all__ = ["Expired", "Output", "TrainerError", "TrainerHost", "TrainerSession"]

#: (label id, JSON record for ``<app>.labels.expired``)
Expired = list[tuple[str, bytes]]
#: what one task frame gave: ``(task, predictions message, rows, float32 scores)`` or ``(task, expired labels)``
Output = tuple[str, bytes, int, bytes] | tuple[str, Expired]


#: Rounds kept open while waiting for their remaining task frames (bounded).
MAX_OPEN_ROUNDS = 256


class TrainerError(RuntimeError):
    """The trainer failed (its traceback is the message) or its process is gone."""


class TrainerSession:
    """The trainer side of one worker; every method is one call from the agents."""

    def __init__(self, topology: Topology, checkpoints: CheckpointStore, app: str | None = None, worker: str = ""):
        self.topology = topology
        self.app = app or topology.name
        self.worker = worker
        self.trainer = Trainer(topology, app=self.app, worker=worker)
        self.checkpoints = checkpoints
        self.checkpointed_step = self._resume()
        self._last_action: dict[str, float] = {}
        self._rounds: dict[str, int] = {}  # round id → task frames of it seen so far

    def _resume(self) -> int:
        """Load the newest verified checkpoint (broken ones are skipped with a warning); its step."""
        loaded = self.checkpoints.load_latest()
        if loaded is None:
            return -1
        tensors, manifest = loaded
        self.trainer.restore(tensors, manifest)
        log.info("checkpoint.resumed", step=self.trainer.steps, dir=str(self.checkpoints.dir))
        return self.trainer.steps

    def status(self) -> dict[str, Any]:
        """Counters the worker reads without a call: steps, buffered rows, late labels settled."""
        tr = self.trainer
        settled = sum(
            c["joined"] + c["expired"] + c["unknown_event"] + c["duplicate"] for c in tr.pending_labels.counts.values()
        )
        return {"steps": tr.steps, "pending": tr.pending(), "labels_settled": settled, "device": str(tr.device)}

    def process(self, frames: list[bytes]) -> tuple[list[Output], dict[str, bytes | None], list[bytes]]:
        """Task frames in the order they were read.

        An examples frame is predicted (before anything learns from it) and buffered; the buffers
        are trained on when its round (every task frame of one ingest poll) is complete, or when
        they are half full. A labels frame is joined
        to the pending examples. Returns per frame ``(task, predictions message, rows, scores)`` or
        ``(task, expired labels)``, the pending-table changes of them all, and the alerts raised
        (drifts and the actions taken on them, JSON records for ``<app>.alerts``).
        """
        tr = self.trainer
        out: list[Output] = []
        for frame in frames:
            batch = decode_batch(frame)
            if batch.kind == "labels":
                out.append((batch.task, [(e.id, e.to_json()) for e in tr.observe_labels(batch)]))
                continue
            preds = tr.observe(batch)
            if self._round_complete(batch.round, batch.round_size) or tr.pending() >= self.topology.buffer_size // 2:
                tr.train()
            scores = np.asarray(preds.scores, dtype=np.float32)
            if scores.ndim == 2:  # multiclass / multilabel: the top probability
                scores = scores.max(axis=1)
            out.append((batch.task, preds.to_json(), len(preds), scores.tobytes()))
        alerts = self._feedback(tr.drift.drain())
        return out, tr.pending_labels.changes(), [a.to_json() for a in alerts]

    def _round_complete(self, round_id: str, size: int) -> bool:
        """Whether this frame is the last of its round to arrive (rounds kept open are bounded)."""
        if not round_id or size <= 1:
            return True
        seen = self._rounds.get(round_id, 0) + 1
        if seen >= size:
            self._rounds.pop(round_id, None)
            return True
        self._rounds[round_id] = seen
        while len(self._rounds) > MAX_OPEN_ROUNDS:
            self._rounds.pop(next(iter(self._rounds)))
        return False

    def _feedback(self, drifts: list[Alert]) -> list[Alert]:
        """Each drift alert, then the actions its task declares (at most once per cool-down)."""
        out: list[Alert] = []
        for alert in drifts:
            out.append(alert)
            spec = self.topology.task(alert.task).drift
            now = self.trainer.drift.clock()
            if not spec.actions or now - self._last_action.get(alert.task, float("-inf")) < spec.cooldown_s:
                continue
            self._last_action[alert.task] = now
            for action in spec.actions:
                details = self._act(action, alert.task, spec)
                out.append(
                    Alert(
                        id=alert_id(alert.id, action),
                        kind="action",
                        app=self.app,
                        task=alert.task,
                        detector=alert.detector,
                        worker=self.worker,
                        ts=now,
                        details={"action": action, "drift_alert": alert.id, **details},
                    )
                )
                log.warning("drift.action", task=alert.task, action=action, alert=alert.id)
        return out

    def _act(self, action: str, task: str, spec: DriftSpec) -> dict[str, Any]:
        tr = self.trainer
        if action == "boost_sampling":
            tr.boost_sampling(task, spec.boost, spec.boost_steps)
            return {"factor": spec.boost, "steps": spec.boost_steps}
        if action == "raise_lr":
            tr.raise_lr(task, spec.lr_factor, spec.boost_steps)
            return {"factor": spec.lr_factor, "steps": spec.boost_steps}
        if action == "reset_head":
            tr.reset_head(task)
            return {}
        loaded = self.checkpoints.load_latest()  # rollback
        if loaded is None:
            return {"skipped": "no checkpoint yet"}
        tr.restore(*loaded)
        return {"to_step": tr.steps}

    def sweep(self) -> tuple[Expired, dict[str, bytes | None]]:
        """Expire pending examples past their task's label TTL."""
        expired = self.trainer.pending_labels.sweep()
        return [(e.id, e.to_json()) for e in expired], self.trainer.pending_labels.changes()

    def train(self) -> int:
        """Train on whatever the buffers hold; the steps taken."""
        return self.trainer.train()

    def restore_pending(self, items: list[tuple[str, bytes]]) -> int:
        """Rebuild the pending-label store from the ``pending`` table (after a restart)."""
        return self.trainer.pending_labels.restore(items)

    def checkpoint(self) -> str | None:
        """Write a checkpoint if the model changed since the last one; the file name."""
        tr = self.trainer
        if tr.steps == self.checkpointed_step:
            return None
        path = self.checkpoints.save(tr.state_tensors(), tr.state_json())
        self.checkpointed_step = tr.steps
        log.info("checkpoint.saved", step=tr.steps, file=path.name)
        return path.name

    def snapshot(self) -> dict[str, Any]:
        """The trainer's metrics (JSON-ready)."""
        tr = self.trainer
        return {
            **tr.snapshot(),
            "pending": tr.pending(),
            "checkpointed_step": self.checkpointed_step,
            "device": str(tr.device),
            "timings_s": dict(tr.timings),
        }


def _serve(conn: Connection, other_end: Connection, make: Callable[[], TrainerSession], torch_threads: int) -> None:
    """The child process: answer calls until the pipe closes or ``close`` is called."""
    import torch

    other_end.close()  # the worker's end: without this, the worker's death would never reach us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(torch_threads)
    try:
        session = make()
    except Exception:
        conn.send((False, traceback.format_exc()))
        return
    gc.collect()
    gc.freeze()  # the model and the modules live as long as the process
    conn.send((True, (None, session.status())))
    while True:
        try:
            name, args = conn.recv()
        except (EOFError, OSError):
            return
        if name == "close":
            conn.send((True, (None, None)))
            return
        try:
            result = getattr(session, name)(*args)
        except Exception:
            conn.send((False, traceback.format_exc()))
            continue
        conn.send((True, (result, session.status())))


#: Socket buffer asked for on the trainer pipe: a call's frames (a few MB) should pass in a few
#: syscalls, since the worker's reader re-acquires the GIL after each (up to a switch interval).
PIPE_BUFFER_BYTES = 8 * 1024 * 1024


def _widen(*conns: Connection) -> None:
    """Grow the socket buffers of a duplex pipe (the kernel caps them at its own maximum)."""
    for c in conns:
        sock = socket.socket(fileno=os.dup(c.fileno()))
        try:
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, PIPE_BUFFER_BYTES)
        except OSError:
            pass
        finally:
            sock.close()


class TrainerHost:
    """Runs a :class:`TrainerSession` in a child process (or a thread) and calls it from asyncio.

    Calls run one at a time, in the order they are made, off the event loop (blocking pipe I/O
    happens in one helper thread, which releases the GIL while it waits).
    """

    def __init__(self, make: Callable[[], TrainerSession], process: bool = True, torch_threads: int = 1):
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-mtl-trainer")
        self._session: TrainerSession | None = None
        self._conn: Connection | None = None
        self._proc: Any = None
        self.closed = False
        if process:
            ctx = multiprocessing.get_context("fork")  # the topology (user callables) is inherited, not pickled
            mine, theirs = ctx.Pipe()
            _widen(mine, theirs)
            self._proc = ctx.Process(
                target=_serve, args=(theirs, mine, make, torch_threads), name="stream-mtl-trainer", daemon=True
            )
            self._proc.start()
            theirs.close()
            self._conn = mine
            #: the session's counters after the last call (steps, buffered rows, late labels settled)
            self.status: dict[str, Any] = self._receive()[1]
        else:
            self._session = make()
            self.status = self._session.status()

    @property
    def pid(self) -> int | None:
        """The trainer process's pid (``None`` when it runs in a thread)."""
        return self._proc.pid if self._proc is not None else None

    def _receive(self) -> Any:
        assert self._conn is not None
        try:
            ok, result = self._conn.recv()
        except (EOFError, OSError):
            code = self._proc.exitcode if self._proc is not None else None
            raise TrainerError(f"the trainer process exited (exit code {code})") from None
        if not ok:
            raise TrainerError(result)
        return result

    def call_sync(self, name: str, *args: Any) -> Any:
        """Call a session method and wait (from a thread that is not the event loop's)."""
        if self.closed:
            raise TrainerError(f"trainer is closed (call {name!r})")
        if self._session is not None:
            result = getattr(self._session, name)(*args)
            self.status = self._session.status()
            return result
        assert self._conn is not None
        try:
            self._conn.send((name, args))
        except (BrokenPipeError, OSError):
            code = self._proc.exitcode if self._proc is not None else None
            raise TrainerError(f"the trainer process exited (exit code {code})") from None
        result, self.status = self._receive()
        return result

    async def call(self, name: str, *args: Any) -> Any:
        """Call a session method without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._io, self.call_sync, name, *args)

    async def aclose(self, timeout: float = 10.0) -> None:
        """:meth:`close` queued behind the calls already made (it never cuts one short), off the event loop."""
        if not self.closed:
            await asyncio.get_running_loop().run_in_executor(self._io, self.close, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the session (its process exits); later calls raise :class:`TrainerError`.

        From a thread that no call is running on (asyncio code uses :meth:`aclose`).
        """
        if self.closed:
            return
        if self._conn is not None:
            try:
                self._conn.send(("close", ()))
                self._conn.poll(timeout)
            except (BrokenPipeError, OSError):
                pass
            self._conn.close()
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(timeout)
        self.closed = True
        self._io.shutdown(wait=False)
