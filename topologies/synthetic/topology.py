"""Synthetic: a generated stream with known structure (16 features, 3 binary + 1 regression task).

The regression task ``r0`` is sparse (half its labels missing). Used by the benchmarks and
the memory check; ``producer.py`` replays it (``STREAM_MTL_SYNTHETIC_EVENTS`` events, default 100k).
"""

from stream_mtl.synthetic import SyntheticStream, synthetic_topology

STREAM = SyntheticStream(n_features=16, n_binary=3, n_regression=1, missing={"r0": 0.5}, seed=0)

topology = synthetic_topology(STREAM, name="synthetic")
