"""Predict-then-learn over task batches: the continual training loop, free of Kafka.

:meth:`Trainer.observe` predicts a task batch with the current model (prequential: before any
update that has seen it), scores it, and buffers it; :meth:`Trainer.train` drains the per-task
buffers in task-mixed mini-batches chosen by the sampler. The Faust trainer agent and the test
driver call these same methods. Given a :class:`~stream_mtl.distributed.ProcessGroup`, it trains one
model with the other ranks through DDP, every step collective (:mod:`stream_mtl.distributed`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from stream_mtl.augment import Augmenter
from stream_mtl.balancing import UncertaintyWeighting, make_balancer
from stream_mtl.batching import AdaptiveSampler, MixedBatch, Reservoir, TaskBuffer, assemble, make_sampler, with_replay
from stream_mtl.codec import PredictionBatch, TaskBatch
from stream_mtl.diagnostics import head_movement, head_vectors, trunk_gradients
from stream_mtl.distributed import Lockstep, ProcessGroup, check_topology
from stream_mtl.drift import DriftMonitor
from stream_mtl.evaluation import TaskMetrics, micro_f1
from stream_mtl.labels import ExpiredLabel, PendingLabels
from stream_mtl.log import get_logger
from stream_mtl.model import MTLModel, block_losses
from stream_mtl.topology import Topology

log = get_logger(__name__)

__all__ = ["Trainer", "default_device"]

#: Distinct label sources counted per task before the rest are counted as "other".
MAX_LABEL_SOURCES = 32
#: Steps between two shared-trunk diagnostics (:mod:`stream_mtl.diagnostics`) in the snapshot. One costs a
#: forward pass and one ``autograd.grad`` per task on the step's batch, so it stays off the hot path.
DIAGNOSTICS_EVERY = 500


def default_device() -> torch.device:
    """CUDA when present, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer:
    """Model, optimiser, per-task buffers, sampler and prequential metrics of one topology."""

    def __init__(
        self,
        topology: Topology,
        device: torch.device | str | None = None,
        seed: int = 0,
        clock: Callable[[], float] = time.time,
        app: str | None = None,
        worker: str = "",
        distributed: ProcessGroup | None = None,
        diagnostics_every: int = DIAGNOSTICS_EVERY,
    ):
        """``distributed``: train with the other ranks of this (initialised) process group; default: alone.

        ``diagnostics_every``: steps between shared-trunk diagnostics (``snapshot()["trunk_diagnostics"]``;
        0: never). Not computed in distributed training (each rank would measure only its own rows).
        """
        if distributed is not None and distributed.enabled:
            check_topology(topology)
        else:
            distributed = None
        torch.manual_seed(seed)
        self.topology = topology
        if device is not None:
            self.device = torch.device(device)
        else:
            self.device = distributed.device() if distributed is not None else default_device()
        self.model = MTLModel(topology).to(self.device)
        #: train/eval only changes dropout: without it, switching modes per step is pure overhead (~7 %)
        self._mode_matters = any(isinstance(m, torch.nn.Dropout) for m in self.model.modules())
        self.balancer = make_balancer(topology.model.balancer, topology)
        if isinstance(self.balancer, UncertaintyWeighting):
            self.balancer.to(self.device)
        self.optimizer = torch.optim.Adam(self._param_groups(), lr=topology.model.lr, fused=True)
        #: DDP and the collectives of training with other ranks (``None``: this process trains alone)
        self.lockstep = (
            Lockstep(distributed, self.model, topology.input_dim, self.balancer.parameters(), self.device)
            if distributed is not None
            else None
        )
        #: the shared trunk's parameters (what PCGrad projects and GradNorm measures)
        self.shared_params = list(self.model.trunk.parameters())
        self.task_weights: dict[str, float] = {t.name: t.weight for t in topology.tasks}
        self.k_max = max(t.output_dim for t in topology.tasks)
        self.buffers = {t.name: TaskBuffer(topology.buffer_size) for t in topology.tasks}
        self.sampler = make_sampler(topology.sampler)
        share = topology.sampler.replay_share
        self.replay_share = share
        self._replay_credit: dict[str, float] = {}
        self.reservoirs = (
            {
                t.name: Reservoir(topology.sampler.replay_size, topology.input_dim, self.k_max, seed=seed + i)
                for i, t in enumerate(topology.tasks)
            }
            if share > 0
            else {}
        )
        self.metrics = {t.name: TaskMetrics(t) for t in topology.tasks}
        self.steps = 0
        self.examples_learned = 0
        self.last_losses: dict[str, float] = {}
        self.batch_composition: dict[str, int] = {}
        self.spec_hash = topology.spec_hash()[:8]
        self.timings = {"predict": 0.0, "metrics": 0.0, "learn": 0.0}
        self.augmenter = Augmenter(topology, seed)
        ttl = {t.name: t.label_ttl_s for t in topology.tasks if t.label_ttl_s is not None}
        self.pending_labels = PendingLabels(topology.max_pending, ttl, clock)
        self._late = set(ttl)
        #: lineage: per source partition, the first and last offset of the events learned from
        self.lineage: dict[str, list[int]] = {}
        self.feature_versions: set[str] = set()
        self.label_delay = {name: [0, 0.0] for name in ttl}  # joined labels, summed delay (s)
        #: joined labels per task by their metadata's "source" (at most MAX_LABEL_SOURCES names, then "other")
        self.label_sources: dict[str, dict[str, int]] = {name: {} for name in ttl}
        #: per-task drift detectors on the prequential error stream (alerts collected until drained)
        self.drift = DriftMonitor(topology, app or topology.name, worker, clock)
        self._lr_boosts: dict[str, tuple[dict[str, Any], float, int]] = {}  # group → (group, base lr, steps left)
        #: called after every optimiser step with the batch composition and the per-task losses (test driver)
        self.step_listeners: list[Callable[[dict[str, int], dict[str, float]], None]] = []
        self.diagnostics_every = diagnostics_every if self.lockstep is None else 0
        #: the last shared-trunk diagnostics (see :mod:`stream_mtl.diagnostics`), ``None`` before the first
        self.trunk_diagnostics: dict[str, Any] | None = None
        self._heads_at_diagnostics = head_vectors(self.model) if self.diagnostics_every else {}

    def _param_groups(self) -> list[dict[str, Any]]:
        """One optimiser group per distinct learning rate: the trunk and the heads at the model lr,
        a head whose task has another ``lr_scale`` at lr × that, the balancer's parameters at 10 × lr.

        Fused Adam runs once per group: five groups of one lr cost ~20 % of a step (measured).
        """
        lr = self.topology.model.lr
        by_lr: dict[float, dict[str, Any]] = {
            lr: {"params": list(self.model.trunk.parameters()), "lr": lr, "name": "trunk"}
        }
        for t in self.topology.tasks:
            g = by_lr.setdefault(
                lr * t.lr_scale, {"params": [], "lr": lr * t.lr_scale, "name": f"heads×{t.lr_scale:g}"}
            )
            g["params"] += list(self.model.heads[t.name].parameters())
        groups = list(by_lr.values())
        extra = self.balancer.parameters()
        if extra:
            groups.append({"params": extra, "lr": lr * 10, "name": "balancer"})
        return groups

    @property
    def version(self) -> str:
        """Model version: topology hash and optimiser step count."""
        return f"{self.spec_hash}-{self.steps}"

    def pending(self) -> int:
        return sum(len(b) for b in self.buffers.values())

    def _targets(self, task_name: str, y: list[Any]) -> np.ndarray:
        task = self.topology.task(task_name)
        width = task.output_dim if task.kind == "multilabel" else 1
        return np.asarray(y, dtype=np.float32).reshape(len(y), width)

    def _decide(self, task_name: str, p: np.ndarray) -> np.ndarray:
        kind = self.topology.task(task_name).kind
        if kind == "binary":
            return p[:, 0] >= 0.5
        if kind == "multiclass":
            return p.argmax(axis=1)
        if kind == "multilabel":
            return (p >= 0.5).astype(np.int64)
        return p[:, 0]

    def observe(self, batch: TaskBatch) -> PredictionBatch:
        """Predict, score and buffer one task batch; returns its predictions.

        Rows without a label (a task with late labels) are predicted now and kept pending.
        """
        t0 = time.perf_counter()
        x = torch.from_numpy(np.ascontiguousarray(batch.x, dtype=np.float32)).to(self.device)
        if self._mode_matters:
            self.model.eval()
        p = self.model.predict(x, batch.task).cpu().numpy()
        decided = self._decide(batch.task, p)
        t1 = time.perf_counter()
        scores = p[:, 0].tolist() if p.shape[1] == 1 else p.tolist()
        preds = PredictionBatch(batch.task, self.version, batch.ids, decided.tolist(), scores)
        xs = batch.x_train if batch.x_train is not None else batch.x
        y = batch.y
        if batch.task in self._late and None in y:
            early = self.pending_labels.take_early(batch.task, batch.ids)
            if early:  # labels that overtook their events: they are labelled now (delay 0: they were first)
                y = list(y)
                for i, (value, _ts, _meta) in early.items():
                    if y[i] is None:
                        y[i] = value
                self._count_joined(batch.task, [0.0] * len(early), [m for _, _, m in early.values()])
            have = [i for i, v in enumerate(y) if v is not None]
            missing = [i for i, v in enumerate(y) if v is None]
            if missing:
                self.pending_labels.add(
                    batch.task,
                    [batch.ids[i] for i in missing],
                    batch.x[missing],
                    None if batch.x_train is None else batch.x_train[missing],
                    decided[missing],
                    batch.offsets,
                    partition=batch.partition,
                )
            y, decided, xs = [y[i] for i in have], decided[have], xs[have]
            ids = [batch.ids[i] for i in have]
        else:
            ids = batch.ids
        t2 = time.perf_counter()
        if y:
            self.metrics[batch.task].update(np.asarray(y), decided)
            self.drift.observe(batch.task, y, decided, batch.offsets, ids)
            self._learn_from(batch.task, xs, y)
        self._trace(batch)
        self.timings["predict"] += t1 - t0
        self.timings["metrics"] += time.perf_counter() - t2
        return preds

    def observe_labels(self, batch: TaskBatch) -> list[ExpiredLabel]:
        """Join a frame of late labels to pending examples: score their earlier predictions, buffer them.

        Returns the labels that found no pending example in time (for ``<app>.labels.expired``).
        """
        res = self.pending_labels.join(batch.task, batch.ids, batch.y, batch.ts or [], batch.meta or [])
        if res.ids and res.x is not None:
            self.metrics[batch.task].update(np.asarray(res.y), np.asarray(res.decided))
            self.drift.observe(batch.task, res.y, np.asarray(res.decided), None, res.ids)
            self._learn_from(batch.task, res.x_train if res.x_train is not None else res.x, res.y)
            self._count_joined(batch.task, res.delays, res.meta)
        return res.expired

    def _count_joined(self, task: str, delays: list[float], metas: list[Any]) -> None:
        """Label delay and label sources of joined late labels (metrics)."""
        d = self.label_delay[task]
        d[0] += len(delays)
        d[1] += float(sum(delays))
        sources = self.label_sources[task]
        for m in metas:
            src = str(m.get("source", "unspecified")) if isinstance(m, dict) else "unspecified"
            if src not in sources and len(sources) >= MAX_LABEL_SOURCES:
                src = "other"
            sources[src] = sources.get(src, 0) + 1

    def _learn_from(self, task: str, x: np.ndarray, y: list[Any]) -> None:
        targets = self._targets(task, y)
        x = np.asarray(x, dtype=np.float32)
        self.buffers[task].push(x, targets)
        self.augmenter.remember(task, x, targets)
        if self.reservoirs:
            self.reservoirs[task].add(x, targets)

    def _trace(self, batch: TaskBatch) -> None:
        self.feature_versions.add(batch.feature_version)
        for src, (first, last) in batch.offsets.items():
            seen = self.lineage.get(src)
            if seen is None:
                self.lineage[src] = [first, last]
            else:
                seen[0] = min(seen[0], first)
                seen[1] = max(seen[1], last)

    def step(self, batch: MixedBatch) -> dict[str, float]:
        """One optimiser step on a mixed batch; returns the per-task losses."""
        if self._mode_matters:
            self.model.train()
        batch = self.augmenter.apply(batch)
        x = torch.from_numpy(batch.x).to(self.device)
        y = torch.from_numpy(batch.y).to(self.device)
        lockstep = self.lockstep
        if lockstep is None:
            losses = block_losses(self.model, x, y, batch.blocks)
        else:
            losses = lockstep.losses(x, y, batch.blocks)  # through DDP's forward, so its backward all-reduces
        self.optimizer.zero_grad(set_to_none=True)
        self.task_weights = self.balancer.backward(losses, self.shared_params)
        if lockstep is not None:
            lockstep.reduce_extra()
        self.optimizer.step()
        if self._lr_boosts:
            self._decay_lr_boosts()
        self.steps += 1
        self.examples_learned += int(batch.x.shape[0])
        self.batch_composition = batch.counts
        self.last_losses = {t: float(v.detach()) for t, v in losses.items()}
        if self.diagnostics_every and self.steps % self.diagnostics_every == 0:
            self._diagnose(x, y, batch.blocks)
        for listener in self.step_listeners:
            listener(self.batch_composition, self.last_losses)
        return self.last_losses

    def _diagnose(self, x: torch.Tensor, y: torch.Tensor, blocks: dict[str, tuple[int, int]]) -> None:
        """Shared-trunk diagnostics on this step's batch (after the update), and how far each head
        moved since the last ones; in eval mode, so dropout draws nothing from torch's generator."""
        if self._mode_matters:
            self.model.eval()
        grads = trunk_gradients(self.model, x, y, blocks, self.task_weights)
        moved = head_movement(self._heads_at_diagnostics, self.model)
        self._heads_at_diagnostics = head_vectors(self.model)
        self.trunk_diagnostics = {"step": self.steps, **grads.to_json(), "head_movement": moved}

    def idle_step(self) -> None:
        """This rank's part of a collective step it has no rows for: a zero-gradient backward through DDP,
        then the optimiser step with the gradient the other ranks' rows gave (the same on every rank)."""
        if self.lockstep is None:
            raise RuntimeError("idle_step is a step of distributed training: this trainer has no process group")
        self.optimizer.zero_grad(set_to_none=True)
        self.lockstep.idle_backward()
        self.lockstep.reduce_extra()
        self.optimizer.step()
        if self._lr_boosts:
            self._decay_lr_boosts()
        self.steps += 1

    def train(self, min_pending: int = 0) -> int:
        """Drain the buffers in mixed mini-batches while more than ``min_pending`` wait; returns steps.

        Distributed, every rank calls it together: it steps while *any* rank has more than
        ``min_pending`` rows waiting (a rank without takes :meth:`idle_step`), so all take the same steps.
        """
        t0 = time.perf_counter()
        steps = 0
        bs = self.topology.batch_size
        lockstep = self.lockstep
        while (ready := self.pending() > min_pending) or lockstep is not None:
            if lockstep is not None and not lockstep.agree(ready):
                break
            if not ready:
                self.idle_step()
                steps += 1
                continue
            sizes = {t: len(b) for t, b in self.buffers.items()}
            counts = self.sampler.allocate(sizes, bs)
            batch = assemble(self.buffers, counts, self.k_max)
            if self.reservoirs:
                batch = with_replay(batch, self.reservoirs, self.replay_share, self._replay_credit)
            losses = self.step(batch)
            if isinstance(self.sampler, AdaptiveSampler):
                self.sampler.observe_losses(losses)
            steps += 1
        self.timings["learn"] += time.perf_counter() - t0
        return steps

    # -- drift feedback ------------------------------------------------------------------------------
    def boost_sampling(self, task: str, factor: float, steps: int) -> None:
        """The task's sampling weight ×``factor``, back to ×1 over ``steps`` batches."""
        self.sampler.boost_task(task, factor, steps)

    def raise_lr(self, task: str, factor: float, steps: int) -> None:
        """The learning rate of the shared trunk and of the task's head ×``factor`` for ``steps`` steps.

        The trunk too: a drift changes what the shared features must encode, and raising the head
        alone measured slower to recover than no action at all (``benchmarks/feedback.py``). The
        head gets its own optimiser group first (its moments stay); heads that share the trunk's
        group ride along. A second call while boosted restarts the count, it does not compound.
        """
        group = self._own_group(task)
        trunk = next(g for g in self.optimizer.param_groups if g.get("name") == "trunk")
        for name, g in ((f"head.{task}", group), ("trunk", trunk)):
            base = self._lr_boosts[name][1] if name in self._lr_boosts else g["lr"]
            g["lr"] = base * factor
            self._lr_boosts[name] = (g, base, steps)

    def _own_group(self, task: str) -> dict[str, Any]:
        """The optimiser group of the task's head, split off the group it shared (named ``head.<task>``)."""
        params = list(self.model.heads[task].parameters())
        mine = {id(p) for p in params}
        group = next(g for g in self.optimizer.param_groups if any(id(p) in mine for p in g["params"]))
        if len(group["params"]) != len(params):
            group["params"] = [p for p in group["params"] if id(p) not in mine]
            self.optimizer.add_param_group({"params": params, "lr": group["lr"], "name": f"head.{task}"})
            group = self.optimizer.param_groups[-1]
        return group

    def _end_lr_boosts(self) -> None:
        for group, base, _left in self._lr_boosts.values():
            group["lr"] = base
        self._lr_boosts.clear()

    def _decay_lr_boosts(self) -> None:
        for name, (group, base, left) in list(self._lr_boosts.items()):
            if left <= 1:
                group["lr"] = base
                del self._lr_boosts[name]
            else:
                self._lr_boosts[name] = (group, base, left - 1)

    def reset_head(self, task: str) -> None:
        """Re-initialise a task's head and forget its optimiser moments."""
        head = self.model.heads[task]
        head.reset_parameters()
        for p in head.parameters():
            self.optimizer.state.pop(p, None)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the training state: model, optimiser moments, balancer parameters."""
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        for idx, st in self.optimizer.state_dict()["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    out[f"optim.{idx}.{k}"] = v
        out.update(self.balancer.tensors())
        return out

    def state_json(self) -> dict[str, Any]:
        """The rest of the training state, JSON-ready (the checkpoint manifest carries it)."""
        osd = self.optimizer.state_dict()
        base = {name: lr for name, (_g, lr, _left) in self._lr_boosts.items()}
        groups = [{**g, "lr": base.get(g.get("name"), g["lr"])} for g in osd["param_groups"]]  # boosts are not state
        return {
            "step": self.steps,
            "examples_learned": self.examples_learned,
            "optimizer": {"param_groups": groups},
            "balancer": self.balancer.state_dict(),
            "sampler": {"credit": dict(self.sampler._credit or {})},
            "offsets": self.lineage,
            "feature_versions": sorted(self.feature_versions),
        }

    def restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Load a checkpoint written from :meth:`state_tensors` and :meth:`state_json`."""
        model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model)
        osd = self.optimizer.state_dict()
        moments: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                moments.setdefault(int(idx), {})[name] = v.to(self.device)
        groups = state.get("optimizer", {}).get("param_groups", osd["param_groups"])
        self._end_lr_boosts()
        for g in groups:
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
            name = str(g.get("name", ""))
            if name.startswith("head.") and name[5:] in self.model.heads:
                self._own_group(name[5:])  # the checkpoint's layout: a head that drift feedback split off
        try:
            self.optimizer.load_state_dict({"state": moments, "param_groups": groups})
        except ValueError as exc:  # a checkpoint of another group layout: the weights still count
            log.warning("checkpoint.optimizer_state_skipped", reason=str(exc))
        self.balancer.load_tensors(tensors)
        self.balancer.load_state_dict(state.get("balancer", {}))
        self.sampler._credit = {k: float(v) for k, v in state.get("sampler", {}).get("credit", {}).items()}
        self.steps = int(state.get("step", 0))
        self.examples_learned = int(state.get("examples_learned", 0))
        self.lineage = {k: list(v) for k, v in state.get("offsets", {}).items()}
        self.feature_versions = set(state.get("feature_versions", []))

    def snapshot(self) -> dict[str, Any]:
        """Per-task metrics, losses and counters (JSON-ready)."""
        return {
            "tasks": {name: m.values() for name, m in self.metrics.items()},
            "micro_f1": micro_f1(self.metrics),
            "steps": self.steps,
            "examples_learned": self.examples_learned,
            "model_version": self.version,
            "losses": self.last_losses,
            "task_weights": self.task_weights,
            "batch_composition": self.batch_composition,
            "buffer_dropped": {t: b.dropped for t, b in self.buffers.items()},
            "labels": {
                t: {
                    **c,
                    "delay_mean_s": self.label_delay[t][1] / max(1, self.label_delay[t][0]),
                    "sources": dict(self.label_sources.get(t, {})),
                }
                for t, c in self.pending_labels.snapshot().items()
            },
            "synthetic": dict(self.augmenter.synthetic),
            "drift": {
                t: {"alerts": n, "lr_boosted": f"head.{t}" in self._lr_boosts} for t, n in self.drift.count.items()
            },
            "lineage": {"offsets": self.lineage, "feature_versions": sorted(self.feature_versions)},
            "trunk_diagnostics": self.trunk_diagnostics,
        }
