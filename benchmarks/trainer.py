"""The trainer's samples/s against a raw torch loop at the same model and batch size, one run.

Both train the synthetic topology's model (16 inputs, trunk 64-64, 3 binary + 1 regression
heads) on the same examples in mini-batches of the topology's ``batch_size`` (512), one torch
thread. The raw loop is the least a hand-written loop does: one forward of the trunk, each head
on its task's rows, the per-task losses summed, backward, fused Adam. The trainer adds what a
stream needs: per-task buffers, the sampler, collation, the balancer, metrics of the losses.
Target: the trainer at ≥ 80 % of the raw loop. Usage::

    .venv/bin/python benchmarks/trainer.py [--examples 400000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stream_mtl.model import MTLModel, task_loss  # noqa: E402
from stream_mtl.synthetic import SyntheticStream, synthetic_topology  # noqa: E402
from stream_mtl.trainer import Trainer  # noqa: E402


def data(n: int, d: int, tasks: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    per = n // len(tasks)
    return {
        t: (rng.normal(size=(per, d)).astype(np.float32), (rng.random((per, 1)) > 0.5).astype(np.float32))
        for t in tasks
    }


def run_trainer(topo, examples: dict[str, tuple[np.ndarray, np.ndarray]], chunk: int = 2000) -> float:
    tr = Trainer(topo, device="cpu")
    n = sum(x.shape[0] for x, _ in examples.values())
    t0 = time.perf_counter()
    for start in range(0, next(iter(examples.values()))[0].shape[0], chunk):
        for task, (x, y) in examples.items():
            xs, ys = x[start : start + chunk], y[start : start + chunk, 0].tolist()
            tr._learn_from(task, xs, ys)  # what observe() buffers, without the prediction
        tr.train()
    return n / (time.perf_counter() - t0)


def run_raw(topo, examples: dict[str, tuple[np.ndarray, np.ndarray]]) -> float:
    torch.manual_seed(0)
    model = MTLModel(topo)
    opt = torch.optim.Adam(model.parameters(), lr=topo.model.lr, fused=True)
    tasks = list(examples)
    per_task = topo.batch_size // len(tasks)
    xs = {t: torch.from_numpy(x) for t, (x, _) in examples.items()}
    ys = {t: torch.from_numpy(y) for t, (_, y) in examples.items()}
    rows = next(iter(xs.values())).shape[0] // per_task * per_task  # whole batches only
    n = rows * len(tasks)
    t0 = time.perf_counter()
    for start in range(0, rows, per_task):
        x = torch.cat([xs[t][start : start + per_task] for t in tasks])
        h = model.trunk(x)
        loss = 0.0
        for i, t in enumerate(tasks):
            a = i * per_task
            loss = loss + task_loss(
                model.tasks[t], model.heads_on(h[a : a + per_task], t), ys[t][start : start + per_task]
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=400_000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    topo = synthetic_topology(SyntheticStream(n_features=16, n_binary=3, n_regression=1))
    examples = data(args.examples, topo.input_dim, [t.name for t in topo.tasks])
    run_raw(topo, data(20_000, topo.input_dim, [t.name for t in topo.tasks]))  # warm-up
    raw = run_raw(topo, examples)
    ours = run_trainer(topo, examples)
    print(f"\n{args.examples:,} examples, batch {topo.batch_size}, trunk {topo.model.trunk}, 4 heads, 1 thread\n")
    print(f"{'loop':<34} {'samples/s':>12}")
    print("-" * 47)
    print(f"{'raw torch loop':<34} {raw:>12,.0f}")
    print(f"{'stream_mtl Trainer.train':<34} {ours:>12,.0f}")
    print(f"\ntrainer / raw: {ours / raw:.1%}\n")
    print(
        orjson.dumps(
            {"trainer_samples_per_s": round(ours), "raw_samples_per_s": round(raw), "ratio": round(ours / raw, 3)}
        ).decode()
    )


if __name__ == "__main__":
    main()
