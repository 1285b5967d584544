"""Topic names of one pipeline, and creating them explicitly with their partition counts.

(Auto-created topics on the embedded broker get an arbitrary partition count, so every
topic is created up front.)

>>> from stream_mtl.topology import EventSchema, FeatureSpec, TaskSpec, Topology
>>> topo = Topology(name="toy", schema=EventSchema(fields={"x": "float", "y": "bool"}),
...                 features=[FeatureSpec(name="n", inputs=["x"])],
...                 tasks=[TaskSpec(name="t", kind="binary", label="y")])
>>> n = TopicNames(topo)
>>> n.source, n.dlq, n.task("t"), n.predictions, n.labels, n.labels_expired
('toy.events', 'toy.dlq', 'toy.task.t', 'toy.predictions', 'toy.labels', 'toy.labels.expired')
"""

from __future__ import annotations

from stream_mtl.log import get_logger
from stream_mtl.topology import Topology

log = get_logger(__name__)

__all__ = ["TopicNames", "create_topics"]

FEATURE_TABLE = "features"
PENDING_TABLE = "pending"
OUTBOX_TABLE = "outbox"


class TopicNames:
    """Every topic a pipeline reads or writes, prefixed by its app id."""

    def __init__(self, topology: Topology, app_id: str | None = None):
        self.topology = topology
        self.app_id = app_id or topology.name
        #: source topic → source name
        self.sources = {f"{self.app_id}.{src}": src for src in topology.sources}

    @property
    def source(self) -> str:
        """The first (in most topologies the only) source topic."""
        return next(iter(self.sources))

    def source_topic(self, source: str) -> str:
        return f"{self.app_id}.{source}"

    @property
    def labels(self) -> str:
        """Late labels: ``{"id", "task", "value", "ts", "meta"}`` keyed by event id."""
        return f"{self.app_id}.labels"

    @property
    def labels_expired(self) -> str:
        """Late labels that found no pending example (too late, unknown event, duplicate)."""
        return f"{self.app_id}.labels.expired"

    @property
    def dlq(self) -> str:
        return f"{self.app_id}.dlq"

    def task(self, name: str) -> str:
        return f"{self.app_id}.task.{name}"

    @property
    def predictions(self) -> str:
        return f"{self.app_id}.predictions"

    @property
    def metrics(self) -> str:
        return f"{self.app_id}.metrics"

    @property
    def feature_changelog(self) -> str:
        """Faust's name for the feature table's changelog."""
        return f"{self.app_id}-{FEATURE_TABLE}-changelog"

    @property
    def alerts(self) -> str:
        """Drift alerts and the actions taken on them (keyed by alert id)."""
        return f"{self.app_id}.alerts"

    @property
    def ingest_app_id(self) -> str:
        """The Faust app id (and consumer group) of ingest-only workers (``--role ingest``)."""
        return f"{self.app_id}-ingest"

    def faust_app_id(self, role: str) -> str:
        """The Faust app id (the consumer group of its task topics, the prefix of its tables) of a ``--role``.

        >>> from stream_mtl.topology import EventSchema, FeatureSpec, TaskSpec, Topology
        >>> topo = Topology(name="toy", schema=EventSchema(fields={"x": "float", "y": "bool"}),
        ...                 features=[FeatureSpec(name="n", inputs=["x"])],
        ...                 tasks=[TaskSpec(name="t", kind="binary", label="y")])
        >>> [TopicNames(topo).faust_app_id(r) for r in ("all", "trainer", "ingest", "task:t")]
        ['toy', 'toy', 'toy-ingest', 'toy-task-t']
        """
        if role == "ingest":
            return self.ingest_app_id
        if role.startswith("task:"):
            return f"{self.app_id}-task-{role[5:]}"
        return self.app_id

    def changelog(self, table: str, role: str = "all") -> str:
        """Faust's name for the changelog of a table of the app that runs ``role`` (``features``: one per pipeline).

        >>> from stream_mtl.topology import EventSchema, FeatureSpec, TaskSpec, Topology
        >>> topo = Topology(name="toy", schema=EventSchema(fields={"x": "float", "y": "bool"}),
        ...                 features=[FeatureSpec(name="n", inputs=["x"])],
        ...                 tasks=[TaskSpec(name="t", kind="binary", label="y")])
        >>> n = TopicNames(topo)
        >>> n.changelog(PENDING_TABLE), n.changelog(OUTBOX_TABLE, "ingest"), n.changelog(PENDING_TABLE, "task:t")
        ('toy-pending-changelog', 'toy-ingest-outbox-changelog', 'toy-task-t-pending-changelog')
        """
        if table == FEATURE_TABLE:
            return self.feature_changelog
        return f"{self.faust_app_id(role)}-{table}-changelog"

    def all(self) -> dict[str, int]:
        """Topic name → partition count."""
        p = self.topology.partitions
        out = {topic: p for topic in self.sources}
        out.update({self.dlq: 1, self.predictions: p, self.metrics: 1, self.feature_changelog: p})
        out.update({self.labels: p, self.labels_expired: 1, self.alerts: 1})
        # the tables of each kind of worker: pending examples where a model trains, the webhook outbox everywhere
        trainers = ["all", *(f"task:{g}" for g in self.topology.trainer_groups() if g)]
        out.update({self.changelog(PENDING_TABLE, role): p for role in trainers})
        out.update({self.changelog(OUTBOX_TABLE, role): 1 for role in [*trainers, "ingest"]})
        for t in self.topology.tasks:
            out[self.task(t.name)] = p
        return out


async def create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    """Create the topics that do not exist yet (idempotent)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        # changelogs keep the latest value per key (a restore reads them whole; real Kafka compacts them)
        new = [
            NewTopic(name, n, 1, topic_configs={"cleanup.policy": "compact"} if name.endswith("-changelog") else None)
            for name, n in topics.items()
            if name not in existing
        ]
        if new:
            await admin.create_topics(new)
            log.info("topics.created", count=len(new))
    finally:
        await admin.close()
