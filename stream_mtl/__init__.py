"""stream_mtl: streaming, online multi-task learning on Kafka with Faust and PyTorch."""

from stream_mtl.topology import (
    DriftSpec,
    EventSchema,
    FeatureSpec,
    ModelSpec,
    SamplerSpec,
    TaskSpec,
    Topology,
    TopologyError,
    load_topology,
)

__version__ = "0.1.0"

__all__ = [
    "DriftSpec",
    "EventSchema",
    "FeatureSpec",
    "ModelSpec",
    "SamplerSpec",
    "TaskSpec",
    "Topology",
    "TopologyError",
    "__version__",
    "load_topology",
]
