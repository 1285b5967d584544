"""The synthetic topology with its sparse, late-labelled regression task ``r0`` in a trainer of its own."""

from stream_mtl.synthetic import SyntheticStream, synthetic_topology

_stream = SyntheticStream.default()
topology = synthetic_topology(
    _stream,
    name="synthetic",
    partitions=2,
    tasks=[t.model_copy(update={"own_trainer": t.name == "r0"}) for t in synthetic_topology(_stream).tasks],
)
