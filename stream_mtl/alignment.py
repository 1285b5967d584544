"""Keep late labels from overtaking their events when ingest reads both topics side by side.

The ingest consumer reads the source topics and ``<app>.labels`` together. With a backlog
(a restart, a burst) it can read the labels topic far ahead of the events they label; the
labels then wait in the trainer's bounded early-label store and may overflow it. Like Kafka
Streams' timestamp-ordered choice between co-partitioned inputs, :class:`LabelAligner`
pauses the labels partitions while their record timestamps run more than ``slack_s`` ahead
of the source's, and resumes them once the source catches up or goes quiet.

>>> a = LabelAligner(slack_s=1.0)
>>> a.observe(source_ts_ms=10_000, labels_ts_ms=10_500, source_records=100)
False
>>> a.observe(source_ts_ms=10_000, labels_ts_ms=12_000, source_records=100)   # labels 2 s ahead
True
>>> a.observe(source_ts_ms=None, labels_ts_ms=None, source_records=0)         # source quiet: resume
False
"""

from __future__ import annotations

__all__ = ["LabelAligner"]


class LabelAligner:
    """Decides, poll by poll, whether the labels partitions should be paused."""

    def __init__(self, slack_s: float = 1.0):
        self.slack_ms = slack_s * 1000
        self.source_ts = -1.0
        self.labels_ts = -1.0
        self.paused = False
        self.pauses = 0

    def observe(self, source_ts_ms: float | None, labels_ts_ms: float | None, source_records: int) -> bool:
        """Record one poll's newest timestamps; returns whether the labels should be paused now."""
        if source_ts_ms is not None:
            self.source_ts = max(self.source_ts, source_ts_ms)
        if labels_ts_ms is not None:
            self.labels_ts = max(self.labels_ts, labels_ts_ms)
        ahead = self.source_ts >= 0 and self.labels_ts - self.source_ts > self.slack_ms
        want = ahead and source_records > 0  # never hold labels back when there is no event to wait for
        if want and not self.paused:
            self.pauses += 1
        self.paused = want
        return want
