"""The synthetic topology with an artificially slow trainer (each task's loss sleeps): backpressure tests."""

import time

import torch
from torch.nn import functional as F

from stream_mtl.synthetic import SyntheticStream, synthetic_topology

#: seconds each task's loss takes: four tasks → ~100 ms a step of 256 rows, ~2.5k rows/s (ingest: ~40k/s)
DELAY_S = 0.025


def slow_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    time.sleep(DELAY_S)
    return F.binary_cross_entropy_with_logits(logits, y)


def slow_huber(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    time.sleep(DELAY_S)
    return F.huber_loss(logits[:, 0], y[:, 0])


_stream = SyntheticStream.default()
_tasks = synthetic_topology(_stream).tasks
topology = synthetic_topology(
    _stream,
    name="synthetic",
    batch_size=256,
    tasks=[t.model_copy(update={"loss": slow_huber if t.kind == "regression" else slow_bce}) for t in _tasks],
)
