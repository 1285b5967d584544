"""Worker settings: one frozen object, read from ``STREAM_MTL_*`` environment variables.

>>> s = Settings(broker="kafka://127.0.0.1:9092", session_timeout=2)
>>> s.bootstrap, s.session_timeout
('127.0.0.1:9092', 2.0)
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stream_mtl.broker import parse_broker_url

__all__ = ["Settings"]


class Settings(BaseSettings):
    """How a worker connects and where it writes; the topology says *what* it computes."""

    model_config = SettingsConfigDict(env_prefix="STREAM_MTL_", frozen=True, extra="forbid")

    broker: str = Field(default="kafka://127.0.0.1:9092", description="kafka://host:port[,host:port]")
    app_id: str | None = Field(default=None, description="topic/group prefix; default: the topology name")
    #: Kafka brokers refuse session timeouts below group.min.session.timeout.ms (6 s by default).
    #: The embedded Tansu broker holds a group join for about half of it, so the demo and tests use 2 s.
    session_timeout: float = Field(default=10.0, gt=0, description="consumer-group session timeout, s")
    commit_interval: float = Field(default=1.0, gt=0, description="seconds between Faust offset commits")
    metrics_interval: float = Field(default=1.0, gt=0, description="seconds between metric snapshots")
    data_dir: Path = Field(
        default=Path(tempfile.gettempdir()) / "stream_mtl",
        description="Faust's local data and the checkpoints (<data_dir>/<app_id>/checkpoints)",
    )
    run_dir: Path | None = Field(default=None, description="where metrics.json is written")
    torch_threads: int = Field(default=1, ge=1, description="leave a core to the event loop")
    #: The model trains in a child process of the worker (forked at start-up), so torch and the event
    #: loop do not share a GIL; False runs the same trainer session in a thread of the worker.
    trainer_process: bool = True
    #: The trainer thread and the event loop share the GIL. At CPython's default 5 ms switch interval the
    #: thread convoys behind the loop (each tiny torch op waits for the GIL); 1 ms measured +25–35 % events/s.
    gil_switch_interval: float = Field(default=0.001, gt=0)
    #: Objects allocated before the first event (modules, the model, Faust) are frozen out of the cyclic
    #: GC, and a young-generation collection runs every this many allocations (CPython: 700). Events are
    #: freed by reference counting; at 700 the collector took ~10 % of the worker's time (0.46 s of GC
    #: per 200k events in ``benchmarks/throughput.py``, 0.06 s at 20,000).
    gc_threshold: int = Field(default=20_000, ge=700)
    webhook_urls: list[str] = Field(default_factory=list, description="where alerts are POSTed (JSON list)")
    webhook_secret_env: str = Field(
        default="STREAM_MTL_WEBHOOK_SECRET",
        description="the environment variable holding the signing secret(s), comma-separated during a rotation",
    )
    webhook_allow_private: bool = Field(default=False, description="allow loopback/private/link-local receivers")
    metrics_port: int | None = Field(default=None, ge=0, description="serve Prometheus /metrics here (0: a free port)")
    metrics_host: str = Field(
        default="127.0.0.1", description="address of the /metrics server (0.0.0.0 in a container)"
    )
    report_every_s: float = Field(default=60.0, ge=0, description="seconds between feature-drift reports (0: never)")
    report_reference: int = Field(default=5000, ge=10, description="rows in the reference window (the first seen)")
    report_current: int = Field(default=1000, ge=10, description="rows in the current window (the last seen)")
    report_keep: int = Field(default=5, ge=1, description="HTML + JSON reports kept")
    log_level: str = Field(default="WARNING", description="DEBUG, INFO, WARNING …")
    #: what this worker runs: the ingest service (decode, validate, features, route), the trainer (task
    #: topics → predict-then-learn), or both. Ingest workers scale with the source partitions; trainer
    #: workers with the task-topic partitions (each in the app's consumer group).
    #: ``task:NAME`` trains one ``own_trainer`` task in a model of its own (its own consumer group and checkpoints).
    role: str = Field(
        default="all",
        pattern=r"^(all|ingest|trainer|task:[A-Za-z0-9_\-]+)$",
        description="all, ingest, trainer or task:NAME",
    )
    checkpoint_interval: float = Field(default=30.0, ge=0, description="seconds between checkpoints (0: never)")
    checkpoint_keep: int = Field(default=3, ge=1, description="checkpoints kept on disk")
    #: Distributed training (torch DDP, ``stream_mtl.distributed``): this many trainer workers train one model.
    #: Every rank's trainer process reads these from its environment (``STREAM_MTL_DIST_*``).
    dist_world_size: int = Field(default=1, ge=1, description="trainer workers training one model (1: alone)")
    dist_rank: int = Field(default=0, ge=0, description="this worker's rank, 0 … dist_world_size - 1")
    dist_init_method: str | None = Field(
        default=None, description="rank 0's rendezvous, tcp://host:port (default tcp://127.0.0.1:29500)"
    )
    dist_backend: Literal["auto", "gloo", "nccl"] = Field(default="auto", description="auto: nccl with CUDA, else gloo")
    dist_timeout: float = Field(default=300.0, gt=0, description="seconds a collective waits for the other ranks")
    dist_sync_interval: float = Field(default=0.05, gt=0, description="seconds between the ranks' lockstep ticks")

    @model_validator(mode="after")
    def _rank_below_world_size(self) -> Settings:
        if self.dist_rank >= self.dist_world_size:
            raise ValueError(f"dist_rank {self.dist_rank} is not below dist_world_size {self.dist_world_size}")
        return self

    @property
    def bootstrap(self) -> str:
        return parse_broker_url(self.broker)
