"""Build the Faust app of a topology: the ingest service, the trainer agent, tables and timers.

Data flow (see ``shared/DESIGN.md``)::

    <app>.<source>… ─ingest service─► <app>.dlq               (bad records, original bytes + reason)
    <app>.labels    ─┘     │  features in the ``features`` table (one write per key per batch)
                           └────────► <app>.task.<name>        (example and late-label frames per task)
    <app>.task.*  ─trainer agent─► <app>.predictions          (predict-then-learn)
                               ├─► <app>.labels.expired       (late labels that found no example)
                               └─  pending examples in the ``pending`` table (bounded, TTL per task)
    metrics timer ───────────────► <app>.metrics              (per-task prequential metrics)

The ingest side reads the source topic in batches with an aiokafka consumer that runs as a
Faust service under the app's lifecycle (Faust's own per-message dispatch would cap it at
~10k events/s); every internal topic carries batches. Agents stay thin: they call the plain
functions of :mod:`stream_mtl.pipeline` and :mod:`stream_mtl.trainer`.

Commit order in the ingest service, per polled batch (at-least-once):
  1. send dead letters and task batches, 2. write coalesced feature-table updates (each tagged with
  the source offset it includes, so a replayed record is never counted twice: the feature state is
  exactly-once), 3. wait for every send, changelog writes included, to be acknowledged, 4. commit
  the source offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import faust
import httpx
import numpy as np
import orjson
import torch
from aiokafka.errors import CommitFailedError, KafkaError
from faust.types import TP
from mode import Service

from stream_mtl.alignment import LabelAligner
from stream_mtl.changelog import committed_offsets, read_latest, read_ranges
from stream_mtl.checkpoint import CheckpointStore
from stream_mtl.distributed import ProcessGroup
from stream_mtl.drift import FeatureDriftMonitor
from stream_mtl.faust_compat import (
    ack_gone,
    ack_offsets,
    guard_read_offsets,
    keep_subscribed,
    no_gap_acks,
    seek_uncommitted_to_start,
    set_fetch_max_wait,
    start_with_producer,
)
from stream_mtl.frame_order import FrameOrder, Missing
from stream_mtl.labels import chunk_partition
from stream_mtl.log import get_logger
from stream_mtl.outbox import WebhookOutbox
from stream_mtl.pipeline import IngestStage, task_frames
from stream_mtl.prometheus import Exporter
from stream_mtl.reports import FeatureWindows, ReportRunner
from stream_mtl.run_report import MetricsHistory
from stream_mtl.settings import Settings
from stream_mtl.topics import FEATURE_TABLE, OUTBOX_TABLE, PENDING_TABLE, TopicNames
from stream_mtl.topology import Topology
from stream_mtl.trainer_host import Expired, TrainerError, TrainerHost, TrainerSession

log = get_logger(__name__)

__all__ = ["Pipeline", "build_app"]

#: Train as soon as no task batch has arrived for this long (a quiet stream still learns).
IDLE_TRAIN_AFTER_S = 0.2

#: A task partition whose end is past the next frame the trainer expects, with nothing delivered for this long,
#: had its last frames skipped by Faust: the trainer reads them itself (:mod:`stream_mtl.frame_order`).
STALLED_AFTER_S = 2.0
#: Frames per partition one stall check reads at most (the next check reads on).
STALL_READ_FRAMES = 256
#: Task-batch frames Faust may buffer per stream ahead of the trainer (backpressure bound).
STREAM_BUFFER_FRAMES = 256
#: How long the broker may hold a fetch for partitions with nothing new (both consumers; see
#: :mod:`stream_mtl.faust_compat`): an idle partition must not hold back a busy one.
FETCH_MAX_WAIT_MS = 20
#: Seconds between webhook delivery rounds (what is due in the outbox).
WEBHOOK_ROUND_S = 0.25


class Pipeline:
    """One worker's pipeline: the Faust app plus the state its agents share."""

    def __init__(self, topology: Topology, settings: Settings):
        self.topology = topology
        self.settings = settings
        self.names = TopicNames(topology, settings.app_id)
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}"
        self.ingest = IngestStage(topology, self.names.sources, self.names.labels)
        #: the resumed checkpoint's task offsets, (topic, partition) → offset, not yet replayed (``None``: not asked)
        self._replay_from: dict[tuple[str, int], int] | None = None
        #: task-topic partitions ("topic", partition) assigned to this worker's trainer, and in which generation …
        self._task_partitions: set[tuple[str, int]] = set()
        self._task_generation: int | None = None
        self._ingest_generation: int | None = None  # the ingest consumer's last generation
        #: … and those of them whose pending examples it holds (restored before their first frame)
        self._pending_ready: set[tuple[str, int]] = set()
        #: where the next frame of each of them must be (Faust can skip frames: see :mod:`stream_mtl.frame_order`)
        self.order = FrameOrder()
        self._order_lock = asyncio.Lock()  # the agent's batches and the stall check plan one at a time
        self._agent_queue: Any = None  # the trainer agent's stream queue (frames Faust delivered, not yet taken)
        self.loop_lag_max = 0.0  # since the last metrics snapshot (s)
        self.loop_lag_mean = 0.0  # exponentially weighted (s)
        self.aligner = LabelAligner()
        self._poll_lock = asyncio.Lock()
        self._app_ready = asyncio.Event()  # set once Faust has started the app (its agents read their topics)
        #: the send futures of polls not yet settled (acknowledged and committed), oldest first
        self._unacked: list[list[Any]] = []
        #: some task takes late labels (the labels topic is read, pending examples are swept)
        self.late = any(t.label_ttl_s is not None for t in topology.tasks)
        self.predicted: dict[str, int] = {t.name: 0 for t in topology.tasks}
        self.started_at = time.time()
        self.first_event_at: float | None = None
        self.last_event_at: float | None = None  # the last poll that returned records
        self.last_batch_at = 0.0
        self.first_prediction_at: float | None = None
        self.timings = {"ingest_send": 0.0, "ingest_commit": 0.0, "predictions_send": 0.0}
        #: what this worker runs (``--role``): the ingest service, the trainer of the shared model, or both; or
        #: (``task:NAME``) the trainer of one ``own_trainer`` task: its own model, consumer group and checkpoints
        role = settings.role
        groups = topology.trainer_groups()
        self.trainer_group = role[5:] if role.startswith("task:") else ""
        if self.trainer_group not in groups:
            own = sorted(g for g in groups if g)
            raise ValueError(
                f"role: {role!r}: {self.trainer_group!r} is not an own_trainer task of topology {topology.name!r}"
                f" (own_trainer tasks: {', '.join(own) or 'none'})"
            )
        #: the tasks this worker's trainer trains, and the topology of its model
        self.train_tasks = groups[self.trainer_group]
        #: task topic → task name, of the tasks this worker's trainer trains
        self.task_of_topic = {self.names.task(t): t for t in self.train_tasks}
        self.train_topology = (
            topology if len(self.train_tasks) == len(topology.tasks) else topology.restricted_to(self.train_tasks)
        )
        self.group_of = {task: group for group, tasks in groups.items() for task in tasks}
        self.runs_ingest = role in ("all", "ingest")
        self.runs_trainer = role != "ingest" and bool(self.train_tasks)
        ckpt_dir = settings.data_dir / self.names.app_id / "checkpoints"
        checkpoints = CheckpointStore(
            ckpt_dir / f"task-{self.trainer_group}" if self.trainer_group else ckpt_dir,
            self.train_topology.spec_hash(),
            keep=settings.checkpoint_keep,
        )
        #: the model and everything that learns, in its own process (see :mod:`stream_mtl.trainer_host`);
        #: started before the Faust app exists, so the fork copies no running threads
        self.webhook_secrets = [
            x.strip() for x in os.environ.get(settings.webhook_secret_env, "").split(",") if x.strip()
        ]
        if settings.webhook_urls and not self.webhook_secrets:  # before any process or port is started
            raise ValueError(f"webhook_urls are set but ${settings.webhook_secret_env} holds no signing secret")
        app_id, worker, model = self.names.app_id, self.worker_id, self.train_topology
        group, replay = ProcessGroup.from_settings(settings), settings.checkpoint_interval > 0
        self.trainer: TrainerHost | None = (
            TrainerHost(
                lambda: TrainerSession(model, checkpoints, app_id, worker, group, replay=replay),
                settings.trainer_process,
                settings.torch_threads,
            )
            if self.runs_trainer
            else None
        )
        self.alerts_sent = 0
        self._http: httpx.AsyncClient | None = None
        self.lag: dict[str, int] = {}  # records behind the end, per input topic (the autoscaling signal)
        ref, cur = settings.report_reference, settings.report_current
        self.windows = FeatureWindows(topology.feature_columns(), ref, cur)
        self.feature_drift = FeatureDriftMonitor(topology, self.names.app_id, self.worker_id)
        windows = {"features": self.windows}
        windows.update({f"predictions-{t.name}": FeatureWindows(["score"], ref, cur) for t in topology.tasks})
        self.reports = ReportRunner(
            windows,
            (settings.run_dir or settings.data_dir / self.names.app_id) / "reports",
            settings.report_every_s,
            settings.report_keep,
        )
        self.exporter = Exporter(self.names.app_id, settings.role)
        self.history = MetricsHistory(settings.run_dir / "metrics.jsonl") if settings.run_dir is not None else None
        self.metrics_port = (
            self.exporter.serve(settings.metrics_port, settings.metrics_host)
            if settings.metrics_port is not None
            else None
        )
        self.app = self._build_app()

    # -- the Faust app -------------------------------------------------------------------------
    def _build_app(self) -> faust.App:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        app = faust.App(
            # the app id is the consumer group of the task topics: an ingest-only worker must not join it (Faust's
            # assignor spreads the task partitions' table actives over every member, agent or not), so it runs in
            # a group of its own; its feature table still writes the app's features changelog (named below)
            self.names.faust_app_id(s.role) if self.runs_trainer else self.names.ingest_app_id,
            broker=f"kafka://{s.bootstrap}",
            store="memory://",
            datadir=str(s.data_dir / f"{self.names.app_id}-{os.getpid()}"),
            web_enabled=False,
            autodiscover=False,
            topic_partitions=self.topology.partitions,
            topic_replication_factor=1,
            topic_allow_declare=False,
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=s.session_timeout,
            broker_heartbeat_interval=min(3.0, s.session_timeout / 4),
            broker_rebalance_timeout=max(2 * s.session_timeout, 4.0),
            broker_commit_interval=s.commit_interval,
            producer_linger=0.005,
            producer_max_request_size=8 * 1024 * 1024,
            consumer_max_fetch_size=8 * 1024 * 1024,
            # each message on an internal topic is a whole batch: buffer a few, not Faust's default 4096
            # (4096 frames of ~130 kB are half a GiB of backlog when the trainer is slower than ingest;
            # 256 are ≤ 33 MiB and still hide the fetch round trip; 32 measured slower)
            stream_buffer_maxsize=STREAM_BUFFER_FRAMES,
            # Faust refuses to recover a changelog partition whose offset this worker wrote itself is above the
            # partition's end offset. Every worker writes the tables' changelogs through the partitioner, and the
            # embedded broker under-reports end offsets (shared/DESIGN.md §6): a worker that was handed a
            # partition it had written to crashed with ConsistencyError in the scale-out test. The feature state
            # does not depend on Faust's recovery (see restore_features).
            recovery_consistency_check=False,
        )
        set_fetch_max_wait(app, FETCH_MAX_WAIT_MS)
        raw = {"key_serializer": "raw", "value_serializer": "raw"}
        json_keys = {"key_serializer": "json", "value_serializer": "json"}
        self.dlq_topic = app.topic(self.names.dlq, **raw)
        self.task_topics = {t.name: app.topic(self.names.task(t.name), **raw) for t in self.topology.tasks}
        self.predictions_topic = app.topic(self.names.predictions, **raw)
        self.metrics_topic = app.topic(self.names.metrics, **raw)
        self.expired_topic = app.topic(self.names.labels_expired, **raw)
        self.alerts_topic = app.topic(self.names.alerts, **raw)
        self.features = app.Table(
            FEATURE_TABLE,
            changelog_topic=app.topic(
                self.names.feature_changelog, partitions=self.topology.partitions, key_type=str, **json_keys
            ),
            default=None,
            partitions=self.topology.partitions,
            use_partitioner=True,  # written from the ingest service, outside stream iteration
            key_type=str,
            # values are plain JSON dicts: a value_type of dict would make recovery call dict.from_data
        )
        # The pending examples' changelog, written by the trainer agent straight to the partition of the task
        # partition they came from (not a Faust table: Faust would recover it by *its* partitioner's placement,
        # and a rebalance would hand a trainer other partitions' examples; see _restore_pending)
        self.pending_changelog = app.topic(
            self.names.changelog(PENDING_TABLE, s.role), partitions=self.topology.partitions, **raw
        )
        self.outbox_table = app.Table(
            OUTBOX_TABLE,
            default=None,
            partitions=1,
            use_partitioner=True,
            key_type=str,
            value_type=bytes,  # undelivered alerts per webhook endpoint (see stream_mtl.outbox)
        )
        self.outbox = WebhookOutbox(
            self.outbox_table,
            s.webhook_urls,
            self.webhook_secrets,
            self._record_delivery,
            allow_private=s.webhook_allow_private,
        )
        if self.trainer is not None:
            self._build_trainer(app)

        @app.task
        async def loop_lag_probe() -> None:
            await self.watch_loop_lag(app)

        @app.timer(self.settings.metrics_interval)
        async def publish_metrics() -> None:
            if self.trainer is not None:
                await self.train_if_idle()
                if self.late:
                    expired, changes = await self.trainer.call("sweep")
                    await self._send_expired(expired)
                    await self._write_pending(changes)
            await self.publish_metrics()

        if s.webhook_urls:

            @app.timer(WEBHOOK_ROUND_S)
            async def deliver_webhooks() -> None:
                if self._http is None:
                    self._http = httpx.AsyncClient()
                await self.outbox.deliver_due(self._http)

        pipeline = self

        class CheckpointOnStop(Service):
            """A last checkpoint when the worker stops cleanly (SIGTERM), then the trainer process exits."""

            async def on_stop(self) -> None:
                trainer = pipeline.trainer
                try:
                    if trainer is not None and pipeline.settings.checkpoint_interval > 0 and not trainer.closed:
                        # what was read is learned and checkpointed, and the pending store written whole: the
                        # next owner of these partitions starts where this worker stopped
                        await trainer.call("train")
                        await trainer.call("checkpoint")
                        await pipeline.hand_over_pending()
                finally:
                    if trainer is not None:
                        await trainer.aclose()
                    pipeline.reports.close()
                    if pipeline._http is not None:
                        await pipeline._http.aclose()

        app.service(CheckpointOnStop)

        class IngestService(Service):
            """Reads the source topic in batches and runs decode → validate → features → route."""

            async def on_start(self) -> None:
                await pipeline.start_ingest()

            @Service.task
            async def _ingest_loop(self) -> None:
                await pipeline.ingest_loop(self)

            async def on_stop(self) -> None:
                await pipeline.stop_ingest()

        if self.runs_ingest:
            # its group join overlaps Faust's own; its first poll waits for the app (see faust_compat)
            start_with_producer(app, lambda: IngestService(beacon=app.beacon, loop=app.loop))

            @app.task
            async def app_ready() -> None:  # Faust runs app tasks once the app has started (tables recovered)
                self._app_ready.set()

        return app

    def _build_trainer(self, app: faust.App) -> None:
        """The trainer agent over every task topic, its subscription guard and the checkpoint timer."""
        raw = {"key_serializer": "raw", "value_serializer": "raw"}
        train_in = app.topic(*[self.names.task(t) for t in self.train_tasks], **raw)

        @app.agent(train_in, name=f"{self.names.app_id}.trainer")
        async def trainer_agent(stream: faust.StreamT) -> None:
            # One frame per trainer call, acked once it returns. Not Faust's stream.take(): when its timeout fires
            # while a value is being added, a value can land in the batch being handed out and be cleared
            # unprocessed (its event acked), and the stream stalled in the roles test. Nor a batch of what the
            # queue holds: a rebalance clears the queue, and frames held back for a batch would never be acked
            # (Faust's revoke waits for them). The stream's own queue (not the topic's) says whether frames wait.
            self._agent_queue = stream.channel.queue
            async for event in stream.noack().events():
                message = event.message
                await self.on_task_batches([event.value], [(message.topic, message.partition, message.offset)])
                await stream.ack(event)

        seek_uncommitted_to_start(app, train_in.topics)
        guard_read_offsets(app, train_in.topics)
        no_gap_acks(app, train_in.topics)

        @app.on_partitions_revoked.connect
        async def on_revoked(app: faust.App, revoked: set[Any], **_: Any) -> None:
            if not any(tp.topic in self.task_of_topic for tp in revoked):
                return  # the first join revokes nothing (and must not wait for the trainer to be built)
            # after a stall check's read (it stops at its next chunk once the rebalance began): nothing of a
            # revoked partition is processed after the hand-over
            async with self._order_lock:
                with contextlib.suppress(TrainerError):  # the trainer is gone: the agent's next call crashes the worker
                    await self.hand_over_pending()

        @app.on_partitions_assigned.connect
        async def on_assigned(app: faust.App, assigned: set[Any], **_: Any) -> None:
            # A partition kept from the previous generation was nobody else's in between: its pending examples and
            # resume offset here are current. Any other partition's are another worker's now (or were meanwhile:
            # a member dropped from the group and let back in skips a generation), so they are forgotten and, for
            # what is assigned, read back before its first frame.
            task_of = self.task_of_topic
            generation = app.consumer_generation_id
            continuous = self._task_generation is not None and generation == self._task_generation + 1
            self._task_generation = generation
            mine = {(tp.topic, tp.partition) for tp in assigned if tp.topic in task_of}
            kept = self._task_partitions & mine if continuous else set()
            lost = [(t, task_of[t], p) for t, p in self._task_partitions - kept]
            self._task_partitions = mine
            self._pending_ready &= kept
            self.order.keep_only(kept)
            self.last_batch_at = time.monotonic()  # the stall check gives Faust time to resume the partitions
            if self.trainer.closed:
                return
            with contextlib.suppress(TrainerError):  # the trainer is gone: the agent's next call crashes the worker
                if self._replay_from is None:
                    offsets = await self.trainer.call("take_resume_offsets")
                    self._replay_from = {_tp(k): v for k, v in offsets.items()}
                if lost:
                    await self.trainer.call("forget_partitions", lost)
            if self._replay_from:  # only what this worker is assigned is replayed here
                self._replay_from = {tp: v for tp, v in self._replay_from.items() if tp in mine}

        @app.task
        async def trainer_started() -> None:
            # the trainer process builds the model while Faust starts (TrainerHost does not wait for it): a
            # session that failed to build crashes the worker now, not at its first event
            try:
                await self.trainer.ready()
            except TrainerError as exc:
                log.error("trainer.failed", error=str(exc)[-2000:])
                await app.crash(exc)

        @app.task
        async def subscription_guard() -> None:
            await keep_subscribed(app, train_in.topics)

        @app.timer(STALLED_AFTER_S / 2)
        async def stall_check() -> None:
            # the last frames of a partition skipped: no later frame shows the gap, so the partition's end does
            def quiet() -> bool:
                idle = time.monotonic() - self.last_batch_at >= STALLED_AFTER_S
                waiting = self._agent_queue is not None and not self._agent_queue.empty()
                return idle and not waiting and not app.rebalancing and not self._order_lock.locked()

            if not quiet():
                return
            ends = {
                tp: app.consumer.highwater(TP(*tp)) or 0 for tp in self.order.expected if tp in self._task_partitions
            }
            async with self._order_lock:
                behind = [  # bounded per check: a rebalance waits for the read in progress
                    Missing(t, p, want, min(ends[t, p], want + STALL_READ_FRAMES))
                    for (t, p), want in self.order.expected.items()
                    if ends.get((t, p), 0) > want
                ]
                if behind and not app.rebalancing:
                    await self._read_missing(behind, "stalled", stoppable=True)

        if self.settings.checkpoint_interval > 0:

            @app.timer(self.settings.checkpoint_interval)
            async def checkpoint_timer() -> None:
                await self.trainer.call("checkpoint")
                if self.late:  # the join marks this checkpoint covers go out now, not with the next trainer reply
                    await self._write_pending(await self.trainer.call("writes"))

    def close(self) -> None:
        """Release the trainer process and the report pool (idempotent; after the event loop has stopped)."""
        if self.trainer is not None and not self.trainer.closed:
            self.trainer.close(timeout=5.0)
        self.reports.close()

    # -- ingest ----------------------------------------------------------------------------------
    async def start_ingest(self) -> None:
        from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
        from aiokafka.coordinator.assignors.range import RangePartitionAssignor

        pipeline = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: Any) -> None:
                return None

            async def on_partitions_assigned(self, assigned: Any) -> None:
                pipeline.aligner.paused = False  # a new assignment starts unpaused
                generation = pipeline._consumer._coordinator.generation  # aiokafka's, set before this call
                await pipeline.restore_features([(tp.topic, tp.partition) for tp in assigned], generation)
                log.info("ingest.assigned", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))

        s = self.settings
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap,
            group_id=f"{self.names.app_id}.ingest",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(s.session_timeout * 1000),
            heartbeat_interval_ms=int(min(3.0, s.session_timeout / 4) * 1000),
            # a join waits for every old member up to the rebalance timeout (aiokafka's default: 300 s,
            # which left a restarted worker waiting for the member it replaced)
            rebalance_timeout_ms=int(max(2 * s.session_timeout, 4.0) * 1000),
            max_partition_fetch_bytes=8 * 1024 * 1024,
            # a fetch for partitions without buffered data (an idle labels topic) blocks the next fetch
            # of the busy source for up to this long: aiokafka's 500 ms default halved the throughput
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            # range: partition p of every source and of the labels topic go to the same worker,
            # so an event and its late label (same key, same partition count) meet there
            partition_assignment_strategy=(RangePartitionAssignor,),
        )
        await self._consumer.start()
        # the labels topic only when some task takes late labels (else nobody may write to it)
        topics = [*self.names.sources, *([self.names.labels] if self.late else [])]
        self._consumer.subscribe(topics, listener=Listener())

    async def restore_features(self, assigned: list[tuple[str, int]], generation: int | None = None) -> None:
        """The feature state of the assigned source partitions, read from the ``features`` changelog.

        Called before the first fetch of a new assignment (aiokafka awaits the listener), so no
        record of a partition is featurised before its state is back. Only partitions this worker did
        not hold in the previous generation (``generation`` − 1) are read (from scratch: what it held of them
        before may be stale); a partition it kept was nobody else's in between, and its state here is current (each
        value carries its source offset, so the polls replayed after a refused commit are not counted
        twice). A rebalance then costs a changelog read only for the partitions that moved.
        """
        sources = [(t, p) for t, p in assigned if t in self.names.sources]
        continuous = generation is not None and self._ingest_generation is not None
        continuous = continuous and generation == self._ingest_generation + 1  # type: ignore[operator]
        self._ingest_generation = generation
        held = self.ingest.partitions() if continuous else set()
        # No poll is featurised while the state is being replaced (the ingest loop takes this lock per poll): a
        # poll processed during the read used a half-restored state and was then overwritten, one poll short.
        async with self._poll_lock:
            # The changelog must hold every poll already featurised before it is read back: a poll whose table
            # writes were still in flight would be restored without them, and if its offsets were then committed
            # (the partition stayed here) its events would never be counted.
            await asyncio.gather(*[f for fs in self._unacked for f in fs], return_exceptions=True)
            self.ingest.drop_partitions_except(sources)
            moved = [tp for tp in sources if tp not in held]
            if not moved:
                return
            bases = tuple(b for t, p in moved for b in self.ingest.reset_partition(t, p))
            prefixes = tuple(b + ":" for b in bases)
            latest = await read_latest(
                self.settings.bootstrap,
                self.names.feature_changelog,
                lambda key: key in bases or key.startswith(prefixes),
            )
            items = [(k, orjson.loads(v)) for k, v in latest.items() if v is not None]
            loaded = sum(self.ingest.load_state(t, p, items) for t, p in moved)
        log.info(
            "ingest.features_restored",
            partitions=len(moved),
            kept=len(sources) - len(moved),
            keys=loaded,
            counts=self.ingest.feature_counts(),
        )

    async def stop_ingest(self) -> None:
        consumer = getattr(self, "_consumer", None)
        if consumer is not None:
            await consumer.stop()

    async def ingest_loop(self, service: Service) -> None:
        """Poll → process → send; a poll's offsets are committed once all its sends are acknowledged.

        The acknowledgement of poll *k* is awaited after poll *k+1* has been sent, so the
        broker round trip overlaps the next batch's work instead of stalling it.
        """
        # not before the trainer agent reads: on a backlog it would get every task's frames topic after topic, and
        # predict many rounds of one task before any round is complete and learned from
        await service.wait_first(self._app_ready.wait())
        consumer = self._consumer
        max_records = self.topology.ingest_batch
        seq = 0
        in_flight: tuple[list[Any], dict[Any, int]] | None = None
        try:
            while not service.should_stop:
                data = await consumer.getmany(timeout_ms=100 if in_flight else 200, max_records=max_records)
                self._align_labels(data)
                if not data:
                    if in_flight:  # quiet stream: settle what is in flight now
                        await self._settle(*in_flight)
                        in_flight = None
                    continue
                self.last_event_at = time.time()
                if self.first_event_at is None:
                    self.first_event_at = self.last_event_at
                seq += 1
                async with self._poll_lock:  # a rebalance's state restore waits for a poll to be sent whole
                    futures = await self._ingest_batch(data, seq)
                    self._unacked.append(futures)
                offsets = {tp: recs[-1].offset + 1 for tp, recs in data.items()}
                if in_flight:
                    await self._settle(*in_flight)
                in_flight = (futures, offsets)
        finally:
            if in_flight:
                await self._settle(*in_flight)

    def _align_labels(self, data: dict[Any, list[Any]]) -> None:
        """Pause the labels partitions while they run ahead of the events (see :mod:`stream_mtl.alignment`)."""
        labels = self.names.labels
        src_ts = lab_ts = None
        src_n = 0
        for tp, recs in data.items():
            if tp.topic == labels:
                lab_ts = max(lab_ts or 0, recs[-1].timestamp)
            else:
                src_ts = max(src_ts or 0, recs[-1].timestamp)
                src_n += len(recs)
        was = self.aligner.paused
        pause = self.aligner.observe(src_ts, lab_ts, src_n)
        if pause != was:
            tps = [tp for tp in self._consumer.assignment() if tp.topic == labels]
            (self._consumer.pause if pause else self._consumer.resume)(*tps)

    async def _ingest_batch(self, data: dict[Any, list[Any]], seq: int) -> list[Any]:
        """Steps 1–2 of the commit order for one poll; returns the send futures."""
        out = self.ingest.process(data)
        t0 = time.perf_counter()
        round_id = f"{self.worker_id}:{seq}"
        futures = []
        for x, partition, last in out.features:
            if self.settings.report_every_s > 0:
                self.windows.add(x)  # bounded windows of the shared features for the drift reports
            if self.feature_drift.columns:  # 1. feature-drift alerts, committed with the poll like the rest
                for alert in self.feature_drift.observe(x, partition, last):
                    futures.append(await self._publish_alert(alert.to_json()))
        for dead in out.dead:  # 1. dead letters: original bytes, reason in headers
            futures.append(await self.dlq_topic.send(key=dead.key, value=dead.value, headers=dead.headers()))
        # 1. one frame per task
        for task, partition, frame in task_frames(out, round_id, self.topology.partitions, self.group_of):
            futures.append(await self.task_topics[task].send(key=task.encode(), value=frame, partition=partition))
        # 2. coalesced feature-table writes: into the changelog partition of their source partition, and
        # acknowledged like the sends above (Faust's own table writes are fire-and-forget)
        table, parts = self.features, out.table_partitions
        for key, state in out.table_updates.items():
            part = parts[key] % self.topology.partitions
            futures.append(table.send_changelog(part, key, state, value_serializer=None if state else "raw"))
            if state is not None:
                table.data[key] = state
            else:
                table.data.pop(key, None)
        self.timings["ingest_send"] += time.perf_counter() - t0
        if out.dead:
            log.warning("ingest.dead_letters", count=len(out.dead), topic=self.names.dlq)
        return futures

    async def _settle(self, futures: list[Any], offsets: dict[Any, int]) -> None:
        """Steps 3–4: every effect of a poll acknowledged, then its source offsets committed."""
        t0 = time.perf_counter()
        if futures:
            await asyncio.gather(*futures)
        self._unacked = [fs for fs in self._unacked if fs is not futures]
        try:
            await self._consumer.commit(offsets)
        except CommitFailedError as exc:
            # the group rebalanced (a worker joined or left, or this one is stopping) and these partitions may be
            # another member's now: it reads them again from the last commit (at-least-once), so this is no error
            log.warning("ingest.commit_refused", partitions=len(offsets), reason=type(exc.__cause__ or exc).__name__)
        self.timings["ingest_commit"] += time.perf_counter() - t0

    # -- trainer ---------------------------------------------------------------------------------
    async def on_task_batches(self, values: list[bytes], positions: list[tuple[str, int, int]] | None = None) -> None:
        """Predict, emit predictions, buffer; train once a round of task batches is complete.

        ``values``: task frames in the order read (the agent hands over one at a time), ``positions``
        their (topic, partition, offset), checked against the frame order first (skipped frames read,
        duplicates left out). A ``labels`` frame is joined to the pending examples instead; labels that
        found none go to ``<app>.labels.expired``. Outputs are sent without waiting: Faust acks the
        frames after this returns and flushes its producer before it commits their offsets
        (at-least-once).
        """
        self.last_batch_at = time.monotonic()
        if positions is None:  # no offsets (unit tests under Faust's test_context): nothing to check
            await self._process_frames(values, positions)
            return
        async with self._order_lock:
            new = {tp for tp in self.order.unknown(positions) if tp in self._task_partitions}
            if self._replay_from:  # the replay reads each partition it names up to where Faust resumes it
                new |= {tp for tp in self._replay_from if tp in self._task_partitions} - self.order.expected.keys()
            if new:  # newly assigned: their next frame is where the group committed (Faust resumes there)
                committed = await committed_offsets(self.settings.bootstrap, self.app.conf.id, sorted(new))
                self.order.start({tp: committed.get(tp, 0) for tp in new})
            if self.late:
                new = {(t, p) for t, p, _ in positions} - self._pending_ready
                if new:
                    await self._restore_pending(new)
            if self._replay_from:  # taken at the first assignment
                await self._replay_missed()
            try:
                await self._in_order(values, positions)
            except BaseException:
                # the plan moved the expectations past these frames, which are not all processed (nor acked):
                # forgotten, the next frame of each partition looks where the group committed again
                self.order.forget({(t, p) for t, p, _ in positions})
                raise

    async def _in_order(self, values: list[bytes], positions: list[tuple[str, int, int]]) -> None:
        """Process the frames as :meth:`FrameOrder.plan` says: duplicates left out, skipped frames read first."""
        steps, dups = self.order.plan(positions)
        if not dups and len(steps) == len(values):  # the usual batch: every frame where it belongs
            await self._process_frames(values, positions)
            return
        take: list[int] = []
        for step in steps:
            if isinstance(step, Missing):
                if take:
                    await self._process_frames([values[i] for i in take], [positions[i] for i in take])
                    take = []
                await self._read_missing([step], "gap")
            else:
                take.append(step.index)
        if take:
            await self._process_frames([values[i] for i in take], [positions[i] for i in take])

    async def _read_missing(self, missing: list[Missing], seen: str, stoppable: bool = False) -> None:
        """Frames Faust skipped: read here, processed, and acknowledged (so the commit may pass them).

        ``seen``: how the skip showed, "gap" (a later frame came) or "stalled" (the partition's end is further).
        Offsets the read does not find are gone (retention): they are acknowledged as Faust's own gaps.
        ``stoppable`` (the stall check's reads, which nothing follows): a rebalance stops the read between
        chunks; what is left unread is not acknowledged (the next owner, or this worker again, reads it from
        the commit). A gap's read is not stopped: the frame after it must not be processed without it.
        """
        ranges = {(m.topic, m.partition): (m.start, m.end) for m in missing}
        spans = {f"{t}:{p}": f"{a}..{b}" for (t, p), (a, b) in ranges.items()}
        log.warning("trainer.frames_skipped", seen=seen, partitions=spans)
        generation = self.app.consumer_generation_id
        cursor = {tp: start for tp, (start, _) in ranges.items()}  # the next offset the read should find
        try:
            async for records in read_ranges(self.settings.bootstrap, ranges):
                if stoppable and (self.app.rebalancing or self.app.consumer_generation_id != generation):
                    log.warning("trainer.skipped_read_stopped", reason="rebalance")
                    return
                await self._process_frames(
                    [r.value for r in records], [(r.topic, r.partition, r.offset) for r in records]
                )
                for r in records:
                    tp = (r.topic, r.partition)
                    if r.offset > cursor[tp]:
                        await ack_gone(self.app, r.topic, r.partition, cursor[tp], r.offset)
                    ack_offsets(self.app, r.topic, r.partition, [r.offset])
                    cursor[tp] = r.offset + 1
                    self.order.start({tp: cursor[tp]})
        except (KafkaError, TimeoutError) as exc:
            # not processed and not acknowledged: the commit stops before them and a restart reads them again
            log.error("trainer.skipped_frames_unread", error=repr(exc))
            await self.app.crash(exc)
            raise
        for (t, p), (_, end) in ranges.items():  # read to the end: what was not found is gone
            if cursor[t, p] < end:
                await ack_gone(self.app, t, p, cursor[t, p], end)
            self.order.start({(t, p): end})

    async def _process_frames(self, values: list[bytes], positions: list[tuple[str, int, int]] | None) -> None:
        """One trainer call, and everything it gave sent: predictions, expired labels, alerts, pending changes."""
        try:
            outputs, changes, alerts = await self.trainer.call("process", list(values), positions)
        except TrainerError as exc:
            # without its trainer the worker must not run on (ingest would keep committing): crash it, so that
            # its supervisor restarts it; these frames are not acknowledged and are read again
            log.error("trainer.failed", error=str(exc)[-2000:])
            await self.app.crash(exc)
            raise
        await self._write_pending(changes)
        for record in alerts:
            await self._publish_alert(record)
        t0 = time.perf_counter()
        for out in outputs:
            if len(out) == 2:
                await self._send_expired(out[1])
                continue
            task, preds, n, scores = out
            if self.settings.report_every_s > 0:  # the prediction windows of the drift reports
                self.reports.windows[f"predictions-{task}"].add(np.frombuffer(scores, np.float32).reshape(-1, 1))
            await self.predictions_topic.send(key=task.encode(), value=preds)
            self.predicted[task] += n
            if self.first_prediction_at is None:
                self.first_prediction_at = time.time()
        self.timings["predictions_send"] += time.perf_counter() - t0

    async def _replay_missed(self) -> None:
        """Once per task partition after a restart: the frames the resumed checkpoint had not learned, first.

        Faust resumes at the committed offsets: a frame is acknowledged once predicted and buffered, so what
        the dead worker learned after its last checkpoint lies below them. The checkpoint says per partition
        where its learning ends (``task_offsets``); those frames are read here, one partition's after the
        other's in turn (so the polls come in order, :func:`~stream_mtl.changelog.read_ranges`), and
        processed ahead of the partitions' first frames (predicted again too: at most one checkpoint interval
        of duplicates), then checkpointed. Not a seek below the committed offset: Faust drops records below
        its read offset, which the batch it is still draining raises again (:mod:`stream_mtl.faust_compat`).
        Partitions this worker loses before their first frame leave the replay (see ``on_assigned``).
        """
        assert self._replay_from is not None
        # every assigned partition the checkpoint names, at once (one frame of each in turn), up to the committed
        # offset Faust resumes it from (the frame order's expectation): frames from there on are Faust's to deliver
        # (or, skipped, the frame order's to read and acknowledge); the replay's own are below the commit
        ranges: dict[tuple[str, int], tuple[int, int]] = {}
        for tp in [tp for tp in self._task_partitions if tp in self._replay_from]:
            start = self._replay_from.pop(tp)
            end = self.order.expected.get(tp, start)
            if start < end:
                ranges[tp] = (start, end)
        replayed = 0
        try:
            async for records in read_ranges(self.settings.bootstrap, ranges):
                await self._process_frames(
                    [r.value for r in records], [(r.topic, r.partition, r.offset) for r in records]
                )
                replayed += len(records)
        except (KafkaError, TimeoutError) as exc:  # what is left is not learned again; nothing is lost
            log.warning("trainer.replay_failed", frames=replayed, error=repr(exc))
        if ranges:
            spans = {f"{t}:{p}": f"{a}..{b}" for (t, p), (a, b) in ranges.items()}
            log.info("trainer.replay_from_checkpoint", partitions=len(ranges), frames=replayed, offsets=spans)
        if replayed and self.settings.checkpoint_interval > 0:
            # a checkpoint of what was just learned again: a worker that crashes again before its first timed
            # checkpoint replays from here, not from the old one (a crash loop would replay more each time)
            await self.trainer.call("train")
            await self.trainer.call("checkpoint")

    async def _publish_alert(self, record: bytes) -> Any:
        """An alert on ``<app>.alerts`` (keyed by its id: idempotent) and into the webhook outbox; the send's future."""
        alert_id = orjson.loads(record)["id"]
        fut = await self.alerts_topic.send(key=alert_id.encode(), value=record)
        self.outbox.add(alert_id, record)
        self.alerts_sent += 1
        log.warning("drift.alert", alert=alert_id)
        return fut

    async def _record_delivery(self, event: dict[str, Any]) -> None:
        """A webhook endpoint refused an alert for good, or was disabled (410): recorded on ``<app>.alerts``."""
        record = {"kind": "delivery", "app": self.names.app_id, "worker": self.worker_id, "ts": time.time(), **event}
        await self.alerts_topic.send(key=str(event["alert"]).encode(), value=orjson.dumps(record))

    async def _send_expired(self, expired: Expired) -> None:
        for eid, record in expired:
            await self.expired_topic.send(key=eid.encode(), value=record)

    async def _write_pending(self, changes: dict[str, bytes | None]) -> list[Any]:
        """Mirror the pending-label store into its changelog, each key to its task partition's partition; the
        send futures."""
        topic = self.pending_changelog
        return [
            await topic.send(key=key.encode(), value=value, partition=chunk_partition(key))
            for key, value in changes.items()
        ]

    async def hand_over_pending(self) -> None:
        """Write the pending store whole, held join marks included, and wait for the broker (before a rebalance
        gives the partitions to another worker, which restores them from the changelog)."""
        if self.trainer is None or self.trainer.closed or not self.late:
            return
        futures = await self._write_pending(await self.trainer.call("handoff"))
        if futures:
            await asyncio.gather(*futures)

    async def _restore_pending(self, new: set[tuple[str, int]]) -> None:
        """Before the first frame of newly assigned task partitions: their pending examples, from the changelog.

        Every task partition assigned now and not restored yet is read in one pass (the first frames of the
        others are usually right behind). Their writers flushed before the rebalance let go of them.
        """
        todo = new | (self._task_partitions - self._pending_ready)
        late = {t.name for t in self.topology.tasks if t.label_ttl_s is not None}
        parts = [(self.task_of_topic[t], p) for t, p in todo if self.task_of_topic[t] in late]
        items: list[tuple[str, bytes]] = []
        if parts:
            prefixes = tuple(f"{p}:{task}:" for task, p in parts)
            latest = await read_latest(
                self.settings.bootstrap,
                self.pending_changelog.get_topic_name(),
                lambda key: key.startswith(prefixes),
                partitions={p for _, p in parts},
            )
            items = [(k, v) for k, v in latest.items() if v is not None]
            rows = await self.trainer.call("restore_pending", items, parts)
            log.info("labels.pending_restored", partitions=len(parts), keys=len(items), rows=rows)
        self._pending_ready |= todo

    async def train_if_idle(self) -> None:
        trainer = self.trainer
        idle = time.monotonic() - self.last_batch_at > IDLE_TRAIN_AFTER_S
        if trainer is not None and trainer.status["pending"] and idle:
            await trainer.call("train")

    async def watch_loop_lag(self, app: faust.App, period: float = 0.05) -> None:
        """How late the event loop wakes a sleeper: the train step must never hold it (a metric)."""
        loop = asyncio.get_running_loop()
        while not app.should_stop:
            t0 = loop.time()
            await asyncio.sleep(period)
            lag = max(0.0, loop.time() - t0 - period)
            self.loop_lag_max = max(self.loop_lag_max, lag)
            self.loop_lag_mean = 0.95 * self.loop_lag_mean + 0.05 * lag

    # -- metrics ---------------------------------------------------------------------------------
    async def snapshot(self) -> dict[str, Any]:
        """This worker's metrics: ingest counters here, the trainer's from its process."""
        ing = self.ingest
        snap = await self.trainer.call("snapshot") if self.trainer is not None else {"timings_s": {}}
        trainer_timings = snap.pop("timings_s")
        return {
            "worker": self.worker_id,
            "role": self.settings.role,
            "ts": time.time(),
            "started_at": self.started_at,
            "first_event_at": self.first_event_at,
            "records": ing.records,
            "events": ing.valid,
            "dlq": ing.dead,
            "predicted": dict(self.predicted),
            **snap,
            "trainer_pid": self.trainer.pid if self.trainer is not None else None,
            "first_prediction_at": self.first_prediction_at,
            "event_loop_lag_ms": {"max": self.loop_lag_max * 1e3, "mean": self.loop_lag_mean * 1e3},
            "labels_received": ing.labels,
            "labels_paused": self.aligner.pauses,
            "alerts_sent": self.alerts_sent,
            "lag": dict(self.lag),
            "feature_drift": _report_summary(self.reports.last.get("features")),
            "prediction_drift": {
                name.removeprefix("predictions-"): {
                    "drift_share": r["drift_share"],
                    "score": r["columns"]["score"]["score"],
                }
                for name, r in self.reports.last.items()
                if name.startswith("predictions-")
            },
            "metrics_port": self.metrics_port,
            "webhooks": {
                "pending": self.outbox.pending(),
                "delivered": self.outbox.delivered,
                "attempts": self.outbox.attempts,
                "given_up": self.outbox.given_up,
            },
            "feature_state_n": ing.feature_counts(),
            "timings_s": {**ing.timings, **trainer_timings, **self.timings},
        }

    async def measure_lag(self) -> dict[str, int]:
        """Records behind the end of each input topic: sources and labels (ingest), task topics (trainer)."""
        lag: dict[str, int] = {}
        consumer = getattr(self, "_consumer", None)
        if consumer is not None:
            for tp in consumer.assignment():
                hw = consumer.highwater(tp)
                if hw is not None:
                    lag[tp.topic] = lag.get(tp.topic, 0) + max(0, hw - await consumer.position(tp))
        try:
            fc = self.app.consumer
            for tp in fc.assignment():
                if tp.topic.startswith(f"{self.names.app_id}.task."):
                    # Kafka's consumer lag (what KEDA scales on): the end minus the committed position. Not Faust's
                    # read offset: it runs ahead of processing by up to the stream buffer (256 frames)
                    hw, done = fc.highwater(tp), fc._committed_offset.get(tp)
                    if hw is not None:
                        lag[tp.topic] = lag.get(tp.topic, 0) + max(0, hw - (done or 0))
        except Exception:  # the Faust consumer is not started yet
            pass
        self.lag = lag
        return lag

    async def publish_metrics(self) -> None:
        if self.settings.report_every_s > 0:
            self.reports.maybe_start()  # in its own process; the result shows in a later snapshot
        await self.measure_lag()
        snap = await self.snapshot()
        self.exporter.update(snap)
        self.loop_lag_max = 0.0
        body = orjson.dumps(snap)
        await self.metrics_topic.send(key=self.worker_id.encode(), value=body)
        if self.settings.run_dir is not None:
            write_json_atomic(self.settings.run_dir / "metrics.json", snap)
            self.history.append(snap)


def _report_summary(last: dict[str, Any] | None, top: int = 20) -> dict[str, Any] | None:
    """The last drift report for the metrics: share, and the ``top`` columns by score."""
    if last is None:
        return None
    cols = sorted(last["columns"].items(), key=lambda kv: -kv[1]["score"])[:top]
    return {**{k: v for k, v in last.items() if k != "columns"}, "columns": {k: v["score"] for k, v in cols}}


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temp file and rename (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(orjson.dumps(obj, option=orjson.OPT_INDENT_2))
    os.replace(tmp, path)


def _tp(key: str) -> tuple[str, int]:
    """ "topic:partition" → (topic, partition)."""
    topic, _, partition = key.rpartition(":")
    return topic, int(partition)


def build_app(topology: Topology, settings: Settings) -> Pipeline:
    """The pipeline (and its Faust app, ``.app``) of a topology."""
    torch.set_num_threads(settings.torch_threads)
    sys.setswitchinterval(settings.gil_switch_interval)
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(settings.gc_threshold, g1, g2)  # the trainer process inherits it
    pipeline = Pipeline(topology, settings)
    gc.collect()
    gc.freeze()  # what exists now lives as long as the worker: no collection needs to walk it again
    return pipeline
