"""The trainer agent under Faust's ``test_context()``: no broker, the real agent body."""

from __future__ import annotations

import asyncio

import numpy as np

from stream_mtl.app import build_app
from stream_mtl.codec import TaskBatch, encode_batch
from stream_mtl.settings import Settings
from stream_mtl.synthetic import SyntheticStream, synthetic_topology


async def test_agent_predicts_then_learns_a_round() -> None:
    gen = SyntheticStream(n_features=4, n_binary=2, n_regression=0, seed=3)
    topo = synthetic_topology(gen, name="unit", batch_size=8)
    pipe = build_app(topo, Settings(broker="kafka://127.0.0.1:1"))
    sent: list[bytes] = []

    async def capture_send(**kwargs: object) -> object:
        sent.append(kwargs["value"])  # type: ignore[arg-type]
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    pipe.predictions_topic.send = capture_send  # the output topic; the agent itself is real
    x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    agent = pipe.app.agents[f"{pipe.names.app_id}.trainer"]
    async with agent.test_context() as ctx:
        for task in ("y0", "y1"):
            frame = TaskBatch(task, [f"e{i}" for i in range(10)], x, [1.0] * 10, round="r", round_size=2)
            await ctx.put(encode_batch(frame))
        for _ in range(500):  # the agent hands torch work to the trainer process: wait for it
            if pipe.predicted["y1"] == 10 and pipe.trainer.status["steps"]:
                break
            await asyncio.sleep(0.01)
    status = pipe.trainer.status
    pipe.trainer.close()
    assert pipe.predicted == {"y0": 10, "y1": 10}
    assert len(sent) == 2
    assert status["steps"] == 3 and status["pending"] == 0  # the round was learned after both arrived
