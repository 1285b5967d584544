"""Synthetic: a generated stream with known structure (16 features, 3 binary + 1 regression task).

The regression task ``r0`` is sparse (half its labels missing) and half of the rest arrive late
on ``synthetic.labels`` (TTL 60 s). Used by the benchmarks and
the memory check; ``producer.py`` replays it (``STREAM_MTL_SYNTHETIC_EVENTS`` events, default 100k).
"""

from stream_mtl.synthetic import SyntheticStream, synthetic_topology

STREAM = SyntheticStream.default()

topology = synthetic_topology(STREAM, name="synthetic")
