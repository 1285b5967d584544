"""The synthetic topology with a slow task in a trainer of its own: ``r0``'s loss sleeps 100 ms a step."""

import time

import torch
from torch.nn import functional as F

from stream_mtl.synthetic import SyntheticStream, synthetic_topology


def slow_huber(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    time.sleep(0.1)
    return F.huber_loss(logits[:, 0], y[:, 0])


_stream = SyntheticStream.default()
topology = synthetic_topology(
    _stream,
    name="synthetic",
    partitions=2,
    batch_size=128,
    tasks=[
        t.model_copy(update={"own_trainer": True, "loss": slow_huber}) if t.name == "r0" else t
        for t in synthetic_topology(_stream).tasks
    ],
)
