"""Drift: the synthetic stream whose concept changes at a known event (``DRIFT_AT``), with feedback on.

Three binary tasks on 16 features; at event ``DRIFT_AT`` every task's weights change. Each task's
ADWIN watches its prequential error; on a drift the task's sampling weight and its head's
learning rate are raised (decaying back over 200 steps), once per 30 s. Alerts and actions go
to ``drift.alerts`` and, with ``STREAM_MTL_WEBHOOK_URLS`` set, to signed webhooks.
``producer.py`` replays ``STREAM_MTL_SYNTHETIC_EVENTS`` events (default 60,000).
"""

from stream_mtl import DriftSpec
from stream_mtl.synthetic import SyntheticStream, synthetic_topology

DRIFT_AT = 30_000
STREAM = SyntheticStream(n_features=16, n_binary=3, n_regression=0, drift_at=DRIFT_AT, noise=0.1, seed=5)

_base = synthetic_topology(STREAM, name="drift", batch_size=256, ingest_batch=500)
FEEDBACK = DriftSpec(detectors=["adwin"], actions=["boost_sampling", "raise_lr"], cooldown_s=30.0)
topology = _base.model_copy(update={"tasks": [t.model_copy(update={"drift": FEEDBACK}) for t in _base.tasks]})
