"""Several trainer processes, one model: torch.distributed DistributedDataParallel in lockstep.

Each trainer process (one per ``stream-mtl worker``, ``dist_rank`` 0 … ``dist_world_size - 1``)
consumes its own share of the task partitions and trains the same model: gradients are averaged by
:class:`~torch.nn.parallel.DistributedDataParallel` (gloo on CPU, nccl on GPU), never by a
parameter server of ours. This module holds the process group's settings (:class:`ProcessGroup`),
:func:`init` / :func:`shutdown`, and :class:`Lockstep`, what a :class:`~stream_mtl.trainer.Trainer`
needs to step in lockstep:

- **Every step is collective.** Streams are uneven, so before each step the ranks agree (one
  ``all_reduce``) on how many of them have rows. While any has, every rank steps: a rank with no
  rows runs an *idle step* (the trunk on one zero row, loss × 0) so that DDP's gradient all-reduce
  lines up, and applies the same averaged gradient. Every rank takes the same number of steps.
- **Empty ranks do not dilute the gradient**: the gradient applied is the mean over the ranks that
  had rows (DDP's all-reduce divides by that count, not by the world size). A head whose task has
  rows on no rank gets no gradient anywhere, as without DDP.
- **The losses come out of DDP's forward** (:class:`LossModule`), so DDP's reducer sees the backward.
- **Balancers**: static weights, DWA and uncertainty weighting (its learned log-variances are
  all-reduced like the model's gradients). GradNorm and PCGrad compute per-task gradients with
  ``torch.autograd.grad``, which DDP does not all-reduce: they are refused (:func:`check_topology`).
- Initial weights are rank 0's (DDP broadcasts them when it wraps the model).
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from stream_mtl.log import get_logger
from stream_mtl.model import MTLModel, block_losses
from stream_mtl.topology import Topology

log = get_logger(__name__)

__all__ = [
    "UNSUPPORTED_BALANCERS",
    "Lockstep",
    "LossModule",
    "ProcessGroup",
    "check_topology",
    "init",
    "shutdown",
]

#: Balancers that cannot train under DDP, and why.
UNSUPPORTED_BALANCERS = {
    "gradnorm": "it measures per-task gradient norms with torch.autograd.grad and learns its weights from them",
    "pcgrad": "it computes per-task trunk gradients with torch.autograd.grad and overwrites the trunk's .grad",
}


class ProcessGroup(BaseModel):
    """Where this trainer sits in the group of trainers that train one model (a frozen value).

    >>> g = ProcessGroup(world_size=2, rank=1)
    >>> g.init_method, g.backend, g.resolved_backend in ("gloo", "nccl"), g.enabled
    ('tcp://127.0.0.1:29500', 'auto', True, True)
    >>> try:
    ...     ProcessGroup(world_size=2, rank=2)
    ... except ValueError as exc:
    ...     print("rank 2 is not below world_size 2" in str(exc))
    True
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    world_size: int = Field(default=1, ge=1, description="trainer processes (1: no process group)")
    rank: int = Field(default=0, ge=0)
    init_method: str = Field(default="tcp://127.0.0.1:29500", description="rank 0's rendezvous, e.g. tcp://host:port")
    backend: Literal["auto", "gloo", "nccl"] = Field(default="auto", description="auto: nccl with CUDA, gloo without")
    timeout_s: float = Field(default=300.0, gt=0, description="how long a collective waits for the other ranks")
    sync_interval_s: float = Field(default=0.05, gt=0, description="a worker's lockstep cadence (trainer_host)")

    @model_validator(mode="after")
    def _rank_in_range(self) -> ProcessGroup:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is not below world_size {self.world_size}")
        return self

    @property
    def resolved_backend(self) -> str:
        """``backend``, with ``auto`` resolved (asked in the trainer process: it touches CUDA)."""
        if self.backend != "auto":
            return self.backend
        return "nccl" if torch.cuda.is_available() else "gloo"

    @property
    def enabled(self) -> bool:
        """More than one trainer: training goes through DDP."""
        return self.world_size > 1

    @classmethod
    def from_settings(cls, settings: Any) -> ProcessGroup:
        """The group a worker's :class:`~stream_mtl.settings.Settings` describe."""
        return cls(
            world_size=settings.dist_world_size,
            rank=settings.dist_rank,
            init_method=settings.dist_init_method or cls.model_fields["init_method"].default,
            backend=settings.dist_backend,
            timeout_s=settings.dist_timeout,
            sync_interval_s=settings.dist_sync_interval,
        )

    def device(self) -> torch.device:
        """This rank's device: its GPU under nccl (``LOCAL_RANK``, else rank modulo the GPUs), else CPU."""
        if self.resolved_backend != "nccl":
            return torch.device("cpu")
        local = int(os.environ.get("LOCAL_RANK", self.rank % max(1, torch.cuda.device_count())))
        return torch.device("cuda", local)


def check_topology(topology: Topology) -> None:
    """Refuse, before any rendezvous, what cannot train under DDP (GradNorm and PCGrad balancers)."""
    kind = topology.model.balancer.kind
    if kind in UNSUPPORTED_BALANCERS:
        raise ValueError(
            f"model.balancer kind {kind!r} cannot train with torch.distributed (dist_world_size > 1): "
            f"{UNSUPPORTED_BALANCERS[kind]}, which DistributedDataParallel does not all-reduce, so the ranks' "
            "weights would drift apart; use 'static', 'uncertainty' or 'dwa'"
        )


def init(group: ProcessGroup) -> None:
    """Join the process group (blocks until every rank has); a no-op when already joined to this one."""
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (group.rank, group.world_size):
            raise RuntimeError(
                f"a process group (rank {dist.get_rank()} of {dist.get_world_size()}) is already initialised, "
                f"not rank {group.rank} of {group.world_size}"
            )
        return
    backend = group.resolved_backend
    if backend == "nccl":
        torch.cuda.set_device(group.device())
    dist.init_process_group(
        backend,
        init_method=group.init_method,
        world_size=group.world_size,
        rank=group.rank,
        timeout=datetime.timedelta(seconds=group.timeout_s),
    )
    log.info("distributed.joined", rank=group.rank, world_size=group.world_size, backend=backend)


def shutdown() -> None:
    """Leave the process group (a no-op when not in one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


class LossModule(nn.Module):
    """What DDP wraps: its forward returns the per-task losses, so DDP's reducer fires on their backward.

    With no blocks (a rank without rows) it returns ``{"": trunk(x).sum() × 0}``: zero gradients
    for the trunk, none for the heads, and a backward that joins the all-reduce. (A model without
    a trunk has only heads to run the zero through: every head gets a zero gradient then.)
    """

    def __init__(self, model: MTLModel):
        super().__init__()
        self.model = model
        self._has_trunk = any(True for _ in model.trunk.parameters())

    def forward(self, x: torch.Tensor, y: torch.Tensor, blocks: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
        if blocks:
            return block_losses(self.model, x, y, blocks)
        if self._has_trunk:
            return {"": self.model.trunk(x).sum() * 0.0}
        return {"": sum(p.sum() for p in self.model.heads.parameters()) * 0.0}


class _Active:
    """The comm hook's state: how many ranks had rows this step (what the summed gradient is divided by)."""

    def __init__(self, world_size: int):
        self.count = world_size


def _mean_over_active(state: _Active, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's all-reduce hook, divided by the ranks that had rows instead of by the world size."""
    buf = bucket.buffer()
    buf.div_(state.count)
    return dist.all_reduce(buf, async_op=True).get_future().then(lambda fut: fut.value()[0])


# DDP checks a hook's annotations against the objects themselves (not the strings of postponed annotations)
_mean_over_active.__annotations__["bucket"] = dist.GradBucket
_mean_over_active.__annotations__["return"] = torch.futures.Future[torch.Tensor]


class Lockstep:
    """A model wrapped in DDP, and the collectives a trainer steps with (see the module docstring).

    Needs the process group (:func:`init`); every method is a collective: every rank calls it, in
    the same order, from one thread.
    """

    def __init__(
        self, group: ProcessGroup, model: MTLModel, input_dim: int, extra: list[nn.Parameter], device: torch.device
    ):
        if not dist.is_initialized():
            raise RuntimeError("the process group is not initialised: call stream_mtl.distributed.init(group) first")
        if (dist.get_rank(), dist.get_world_size()) != (group.rank, group.world_size):
            raise RuntimeError(f"this process is rank {dist.get_rank()} of {dist.get_world_size()}, not {group}")
        self.group = group
        self.device = device
        self.input_dim = input_dim
        self._active = _Active(group.world_size)
        #: find_unused_parameters: the heads of tasks with no rows in a rank's batch get no gradient there (DDP
        #: warns once if a step happens to use every parameter: a false positive, the next batch may not)
        self.ddp = nn.parallel.DistributedDataParallel(
            LossModule(model),
            device_ids=[torch.cuda.current_device() if device.index is None else device.index]
            if device.type == "cuda"
            else None,
            find_unused_parameters=True,
        )
        self.ddp.register_comm_hook(self._active, _mean_over_active)
        #: parameters trained outside the model (the balancer's): their gradients are all-reduced by hand
        self.extra = list(extra)

    @property
    def rank(self) -> int:
        return self.group.rank

    def agree(self, ready: bool) -> int:
        """How many ranks are ready to step (0: none, the loop ends everywhere)."""
        flag = torch.tensor([int(ready)], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag)
        self._active.count = max(1, int(flag.item()))
        return int(flag.item())

    def losses(self, x: torch.Tensor, y: torch.Tensor, blocks: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
        """The per-task losses of a mixed batch, through DDP's forward."""
        return self.ddp(x, y, blocks)

    def idle_backward(self) -> None:
        """This rank's share of a step it has no rows for: a zero-gradient backward that joins DDP's all-reduce."""
        x = torch.zeros(1, self.input_dim, device=self.device)
        self.ddp(x, x, {})[""].backward()

    def reduce_extra(self) -> None:
        """Average the balancer's gradients over the ranks that had rows (a rank without rows adds zeros)."""
        if not self.extra:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.extra])
        flat.div_(self._active.count)
        dist.all_reduce(flat)
        offset = 0
        for p in self.extra:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def agree_max(self, values: list[int]) -> list[int]:
        """The element-wise maximum of ``values`` over the ranks (flags, requests)."""
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def agree_range(self, value: int) -> tuple[int, int]:
        """The minimum and the maximum of ``value`` over the ranks."""
        hi, neg_lo = self.agree_max([value, -value])
        return -neg_lo, hi

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's, in place."""
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=0)
