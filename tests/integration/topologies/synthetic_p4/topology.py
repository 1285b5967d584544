"""The synthetic topology on four partitions per topic (scale-out and chaos tests)."""

from stream_mtl.synthetic import SyntheticStream, synthetic_topology

topology = synthetic_topology(SyntheticStream.default(), name="synthetic", partitions=4)
