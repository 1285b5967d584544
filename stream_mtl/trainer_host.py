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

**Distributed** (``STREAM_MTL_DIST_WORLD_SIZE`` > 1, :mod:`stream_mtl.distributed`): the session joins
the process group in the trainer process, and the ranks train one model through DDP. Their workers
call them at unrelated moments, so no call trains: a *lockstep thread* in each trainer process ticks
every ``dist_sync_interval`` seconds (sooner when a round completes or a buffer is half full). Each
tick is one small ``all_reduce`` taken without the session's lock (so a rank waiting for a slower one
never blocks its own worker's calls): a stop request, whether any rank has rows, and the drift actions
that change the model. If anything is to do, every rank takes the lock and applies those actions and
trains in lockstep (:meth:`~stream_mtl.trainer.Trainer.train`: every step collective, a rank without
rows takes an idle step). A rank with nothing to do still ticks, so nobody waits forever. Model-changing
drift actions (``raise_lr``, ``reset_head``, ``rollback``) are queued and applied on every rank at the
next tick (a reset head takes rank 0's new weights; a rollback loads rank 0's newest checkpoint
everywhere); ``boost_sampling`` only changes which local rows are drawn, so it acts at once. Only
rank 0 writes checkpoints; every rank resumes from rank 0's newest, in the same (shared) directory.
When one rank closes, every rank's lockstep ends at the next tick; a session whose lockstep ended (or
failed) refuses ``process`` from then on, so its worker stops instead of ingesting without learning.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import multiprocessing
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from stream_mtl.alerts import Alert, alert_id
from stream_mtl.checkpoint import CheckpointError, CheckpointStore
from stream_mtl.codec import decode_batch
from stream_mtl.distributed import ProcessGroup, check_topology
from stream_mtl.distributed import init as join_group
from stream_mtl.distributed import shutdown as leave_group
from stream_mtl.held_writes import HeldWrites
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

#: Drift actions that change the model: distributed, every rank applies them together (in this order).
LOCKSTEP_ACTIONS = ("rollback", "reset_head", "raise_lr")


class TrainerError(RuntimeError):
    """The trainer failed (its traceback is the message) or its process is gone."""


class TrainerSession:
    """The trainer side of one worker; every method is one call from the agents (through :meth:`call`).

    ``distributed``: the process group to train in (joined here; the worker passes
    :meth:`~stream_mtl.distributed.ProcessGroup.from_settings`); default: alone. See the module docstring
    for the lockstep.
    ``seed``, ``clock`` and ``device`` go to the :class:`~stream_mtl.trainer.Trainer` (the test driver,
    :mod:`stream_mtl.testing`, passes a seed and a clock it controls).
    """

    def __init__(
        self,
        topology: Topology,
        checkpoints: CheckpointStore,
        app: str | None = None,
        worker: str = "",
        distributed: ProcessGroup | None = None,
        seed: int = 0,
        clock: Callable[[], float] = time.time,
        device: str | None = None,
        replay: bool = False,
    ):
        self.topology = topology
        self.app = app or topology.name
        self.worker = worker
        #: the process group this trainer trains one model in (``None``: it trains alone)
        self.group = distributed if distributed is not None and distributed.enabled else None
        if self.group is not None:
            check_topology(topology)  # a refused balancer fails now, not after waiting for the other ranks
            join_group(self.group)
        self.trainer = Trainer(
            topology, device=device, seed=seed, clock=clock, app=self.app, worker=worker, distributed=self.group
        )
        self.checkpoints = checkpoints
        #: held by every call (:meth:`call`) and by the lockstep thread while it trains
        self.lock = threading.Lock()
        self._last_action: dict[str, float] = {}
        self._rounds: dict[str, int] = {}  # round id → task frames of it seen so far
        self._tasks = [t.name for t in topology.tasks]
        #: why the lockstep ended (a rank left, a collective failed); ``None`` while it runs
        self.lockstep_ended: str | None = None
        #: per task-topic partition ("topic:partition"): the offset after the last frame processed …
        self._read: dict[str, int] = {}
        #: … and after the last frame whose rows are all in the weights (buffers drained): what a checkpoint
        #: records as the offsets to re-read from, so a restart learns again what the checkpoint lacks
        self.learned_upto: dict[str, int] = {}
        #: the resumed checkpoint's ``learned_upto``, until the worker's first assignment takes it
        self._resume_offsets: dict[str, int] = {}
        #: ``replay``: a restart replays from the checkpoint's offsets, so the pending store's closing writes
        #: wait for a checkpoint past their frame (:mod:`stream_mtl.held_writes`); distributed, nothing replays
        self.held = HeldWrites() if replay and self.group is None else None
        self._out: dict[str, bytes | None] = {}  # pending-store writes for the next call's reply
        if self.group is None:
            self.checkpointed_step = self._resume()
            return
        self.checkpointed_step = self._resume_together()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._queued: set[tuple[int, int]] = set()  # (LOCKSTEP_ACTIONS index, task index)
        self._stepper = threading.Thread(target=self._lockstep, name="stream-mtl-lockstep", daemon=True)
        self._stepper.start()

    def call(self, name: str, args: tuple[Any, ...] = ()) -> tuple[Any, dict[str, Any]]:
        """One method under the session's lock (the lockstep thread trains under it too); result and status."""
        with self.lock:
            return getattr(self, name)(*args), self.status()

    def _resume(self) -> int:
        """Load the newest verified checkpoint (broken ones are skipped with a warning); its step."""
        loaded = self.checkpoints.load_latest()
        if loaded is None:
            return -1
        tensors, manifest = loaded
        self.trainer.restore(tensors, manifest)
        self._resume_offsets = {str(k): int(v) for k, v in manifest.get("task_offsets", {}).items()}
        self.learned_upto = dict(self._resume_offsets)  # a partition not read again yet still resumes from there
        log.info(
            "checkpoint.resumed",
            step=self.trainer.steps,
            dir=str(self.checkpoints.dir),
            partitions=len(self._resume_offsets),
        )
        return self.trainer.steps

    # -- distributed ---------------------------------------------------------------------------------
    def _agreed_checkpoint(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Rank 0's newest verified checkpoint, loaded by every rank (collective); ``None`` if it has none.

        Raises :class:`CheckpointError` on every rank when some rank cannot read it (not a shared directory).
        """
        ls = self.trainer.lockstep
        assert ls is not None and self.group is not None
        loaded: tuple[dict[str, Any], dict[str, Any]] | None = None
        step = -1
        if self.group.rank == 0:
            loaded = self.checkpoints.load_latest()
            step = int(loaded[1].get("step", 0)) if loaded is not None else -1
        step = ls.agree_max([step])[0]
        if step < 0:
            return None
        if self.group.rank != 0:
            try:
                loaded = self.checkpoints.load_step(step)
            except CheckpointError as exc:
                log.error("distributed.checkpoint_unreadable", rank=self.group.rank, step=step, error=str(exc))
        if ls.agree_range(int(loaded is not None))[0] == 0:
            raise CheckpointError(
                f"a rank could not read rank 0's checkpoint of step {step} in {self.checkpoints.dir}: every rank "
                "must use the same checkpoint directory (shared storage)"
            )
        return loaded

    def _resume_together(self) -> int:
        """Every rank resumes from rank 0's newest checkpoint (their weights are rank 0's already)."""
        loaded = self._agreed_checkpoint()
        if loaded is None:
            return -1
        self.trainer.restore(*loaded)
        log.info("checkpoint.resumed", step=self.trainer.steps, dir=str(self.checkpoints.dir), rank=self.group.rank)
        return self.trainer.steps

    def _lockstep(self) -> None:
        """The lockstep thread: one collective tick every ``sync_interval_s`` (see the module docstring)."""
        assert self.group is not None
        tr, n = self.trainer, len(self._tasks)
        ls = tr.lockstep
        assert ls is not None
        try:
            while True:
                self._wake.wait(self.group.sync_interval_s)
                self._wake.clear()
                queued = self._queued.copy()  # one C call: atomic against the calls' thread
                flags = [self.group.rank + 1 if self._stopping.is_set() else 0, int(tr.pending() > 0)]
                flags += [0] * (len(LOCKSTEP_ACTIONS) * n)
                for action, task in queued:
                    flags[2 + action * n + task] = 1
                agreed = ls.agree_max(flags)  # without the lock: waiting for a slower rank blocks no call
                if agreed[0]:
                    self.lockstep_ended = f"rank {agreed[0] - 1} left the process group"
                    log.warning("distributed.lockstep_ended", rank=self.group.rank, reason=self.lockstep_ended)
                    return
                if not any(agreed[1:]):
                    continue
                with self.lock:
                    self._apply_actions(agreed[2:])
                    self._queued -= queued
                    tr.train()
        except Exception:
            self.lockstep_ended = f"the lockstep failed:\n{traceback.format_exc()}"
            log.error("distributed.lockstep_failed", rank=self.group.rank, error=self.lockstep_ended)

    def _apply_actions(self, flags: list[int]) -> None:
        """The model-changing drift actions any rank asked for, applied on every rank (collective)."""
        tr, n = self.trainer, len(self._tasks)
        ls = tr.lockstep
        assert ls is not None
        if any(flags[:n]):
            try:
                loaded = self._agreed_checkpoint()
            except CheckpointError as exc:  # every rank skips it alike
                log.error("distributed.rollback_skipped", error=str(exc))
                loaded = None
            if loaded is not None:
                tr.restore(*loaded)
                log.warning("distributed.rollback", step=tr.steps)
        for i, task in enumerate(self._tasks):
            if flags[n + i]:
                tr.reset_head(task)
                ls.broadcast(list(tr.model.heads[task].parameters()))  # rank 0's fresh weights everywhere
        for i, task in enumerate(self._tasks):
            if flags[2 * n + i]:
                spec = self.topology.task(task).drift
                tr.raise_lr(task, spec.lr_factor, spec.boost_steps)

    def _check_lockstep(self) -> None:
        if self.lockstep_ended is not None:
            raise RuntimeError(
                f"distributed training stopped ({self.lockstep_ended}): this trainer can no longer train in "
                "lockstep with the other ranks; restart the workers"
            )

    def close(self, timeout: float = 10.0) -> None:
        """End the lockstep (every rank's, at the next tick) and leave the process group; alone: nothing."""
        if self.group is None:
            return
        self._stopping.set()
        self._wake.set()
        self._stepper.join(timeout)
        if not self._stepper.is_alive():
            leave_group()

    def digest(self) -> str:
        """sha256 of the training state (model, optimiser moments, balancer): equal on every rank."""
        h = hashlib.sha256()
        for name, t in sorted(self.trainer.state_tensors().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def status(self) -> dict[str, Any]:
        """Counters the worker reads without a call: steps, buffered rows, late labels settled."""
        tr = self.trainer
        settled = sum(
            c["joined"] + c["expired"] + c["unknown_event"] + c["duplicate"] for c in tr.pending_labels.counts.values()
        )
        return {"steps": tr.steps, "pending": tr.pending(), "labels_settled": settled, "device": str(tr.device)}

    def process(
        self, frames: list[bytes], positions: list[tuple[str, int, int]] | None = None
    ) -> tuple[list[Output], dict[str, bytes | None], list[bytes]]:
        """Task frames in the order they were read; ``positions``: each frame's (topic, partition, offset).

        An examples frame is predicted (before anything learns from it) and buffered; the buffers
        are trained on when its round (every task frame of one ingest poll) is complete, or when
        they are half full. A labels frame is joined to the pending examples (and counts towards its
        round like the others). Returns per frame ``(task, predictions message, rows, scores)`` or
        ``(task, expired labels)``, the pending-table changes of them all, and the alerts raised
        (drifts and the actions taken on them, JSON records for ``<app>.alerts``).

        The positions tell a checkpoint where to resume (:attr:`learned_upto`); without them it records none.
        """
        tr = self.trainer
        if self.group is not None:
            self._check_lockstep()
        out: list[Output] = []
        for i, frame in enumerate(frames):
            batch = decode_batch(frame)
            if positions is not None:
                topic, batch.partition, offset = positions[i]
                self._read[f"{topic}:{batch.partition}"] = offset + 1
            if batch.kind == "labels":
                out.append((batch.task, [(e.id, e.to_json()) for e in tr.observe_labels(batch)]))
            else:
                preds = tr.observe(batch)
                scores = np.asarray(preds.scores, dtype=np.float32)
                if scores.ndim == 2:  # multiclass / multilabel: the top probability
                    scores = scores.max(axis=1)
                out.append((batch.task, preds.to_json(), len(preds), scores.tobytes()))
            # a labels frame counts towards its round too (the round's size counts it): a poll that carried
            # late labels would otherwise never complete, and nothing trained until a buffer was half full
            if self._round_complete(batch.round, batch.round_size) or tr.pending() >= self.topology.buffer_size // 2:
                if self.group is None:
                    tr.train()
                else:
                    self._wake.set()  # the lockstep thread trains, with the other ranks
            if self.group is None and tr.pending() == 0:
                self.learned_upto.update(self._read)  # every row read so far is in the weights
            if self.held is not None and positions is not None:
                self._out.update(self.held.hold(f"{topic}:{batch.partition}", offset, tr.pending_labels.changes()))
        alerts = self._feedback(tr.drift.drain())
        return out, self.writes(), [a.to_json() for a in alerts]

    def writes(self) -> dict[str, bytes | None]:
        """The pending-store writes to send now: released held ones, then the store's newest changes."""
        changes = self.trainer.pending_labels.changes()
        if self.held is not None:
            self.held.supersede(set(changes))
        out, self._out = {**self._out, **changes}, {}
        return out

    def handoff(self) -> dict[str, bytes | None]:
        """Every pending-store write, held ones included: the partitions are handed over (rebalance, clean stop)."""
        if self.held is not None:
            self._out.update(self.held.release_all())
        return self.writes()

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
        if self.group is not None and action in LOCKSTEP_ACTIONS:
            self._queued.add((LOCKSTEP_ACTIONS.index(action), self._tasks.index(task)))
            self._wake.set()
            return {"deferred": "applied on every rank at the next lockstep tick"}
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
        return [(e.id, e.to_json()) for e in expired], self.writes()

    def train(self) -> int:
        """Train on whatever the buffers hold; the steps taken (distributed: wakes the lockstep thread, 0)."""
        if self.group is not None:
            self._check_lockstep()
            self._wake.set()
            return 0
        steps = self.trainer.train()
        self.learned_upto.update(self._read)
        return steps

    def take_resume_offsets(self) -> dict[str, int]:
        """Once: the offsets the resumed checkpoint learned up to, per "topic:partition" (then ``{}``).

        The worker replays each partition from there before its first frame
        (:meth:`stream_mtl.app.Pipeline.on_task_batches`), so what was learned after that checkpoint is
        learned again. Distributed, there are none: rank 0's checkpoint knows only rank 0's partitions.
        """
        offsets, self._resume_offsets = self._resume_offsets, {}
        return offsets

    def forget_partitions(self, partitions: list[tuple[str, str, int]]) -> int:
        """(topic, task, partition)s revoked from this worker: its checkpoints no longer say where to resume
        them, and their pending examples are the next owner's (restored from the changelog, not deleted).
        Returns the pending chunks dropped."""
        for topic, _task, partition in partitions:
            self._read.pop(f"{topic}:{partition}", None)
            self.learned_upto.pop(f"{topic}:{partition}", None)
        if self.held is not None:
            self.held.discard_partitions({f"{topic}:{partition}" for topic, _task, partition in partitions})
        return self.trainer.pending_labels.drop_partitions({(task, p) for _topic, task, p in partitions})

    def restore_pending(self, items: list[tuple[str, bytes]], parts: list[tuple[str, int]]) -> int:
        """The pending examples of these (task, partition)s, from the ``pending`` changelog (on assignment)."""
        return self.trainer.pending_labels.restore(items, {(t, p) for t, p in parts})

    def checkpoint(self) -> str | None:
        """Write a checkpoint if the model changed since the last one; the file name."""
        tr = self.trainer
        if tr.steps == self.checkpointed_step or (self.group is not None and self.group.rank != 0):
            return None  # distributed: rank 0 writes, for every rank
        state = tr.state_json()
        if self.group is None:
            state["task_offsets"] = dict(self.learned_upto)
        path = self.checkpoints.save(tr.state_tensors(), state)
        self.checkpointed_step = tr.steps
        if self.held is not None:  # what this checkpoint learned is not replayed: its rows' join marks can go out
            self._out.update(self.held.release(self.learned_upto))
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
            **(
                {"held_writes": {"frames": len(self.held), "released_early": self.held.released_early}}
                if self.held is not None
                else {}
            ),
            **(
                {
                    "distributed": {
                        "rank": self.group.rank,
                        "world_size": self.group.world_size,
                        "backend": self.group.resolved_backend,
                        "lockstep": "running" if self.lockstep_ended is None else self.lockstep_ended,
                        # equal on every rank at equal steps: what a check that the replicas agree compares
                        "state_sha256": self.digest(),
                    }
                }
                if self.group is not None
                else {}
            ),
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
            session.close()
            conn.send((True, (None, None)))
            return
        try:
            reply = session.call(name, args)
        except Exception:
            conn.send((False, traceback.format_exc()))
            continue
        conn.send((True, reply))


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
            # not waited for here: the worker starts Faust and joins its groups while the model is built (~2 s
            # of torch start-up); the first call (or :meth:`ready`) waits for it, and raises if it failed
            self._ready = False
            #: the session's counters after the last call (steps, buffered rows, late labels settled)
            self.status: dict[str, Any] = {"steps": 0, "pending": 0, "labels_settled": 0, "device": "starting"}
        else:
            self._session = make()
            self._ready = True
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
            result, self.status = self._session.call(name, args)
            return result
        assert self._conn is not None
        self._wait_ready()
        try:
            self._conn.send((name, args))
        except (BrokenPipeError, OSError):
            code = self._proc.exitcode if self._proc is not None else None
            raise TrainerError(f"the trainer process exited (exit code {code})") from None
        result, self.status = self._receive()
        return result

    def _wait_ready(self) -> None:
        if self._ready:
            return
        try:
            self.status = self._receive()[1]  # the session's first status, or its construction's traceback
        except TrainerError:
            self.close(timeout=1.0)  # a session that failed to build: later calls say the trainer is closed
            raise
        self._ready = True

    async def ready(self) -> None:
        """Wait until the session is built (:class:`TrainerError` with its traceback if that failed)."""
        if not self._ready:
            await asyncio.get_running_loop().run_in_executor(self._io, self._wait_ready)

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
        if self._session is not None:
            self._session.close(timeout)
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
