"""Feature-drift reports: bounded windows, evidently's DataDrift preset in a child process, K files kept."""

from __future__ import annotations

import asyncio

import numpy as np
import orjson

from stream_mtl.reports import FeatureWindows, ReportRunner, run_report
from stream_mtl.synthetic import SyntheticStream, synthetic_topology


def test_windows_are_bounded_and_the_current_one_keeps_the_newest_rows_in_order() -> None:
    w = FeatureWindows(["a"], reference=5, current=4)
    for start in range(0, 100, 7):
        w.add(np.arange(start, start + 7, dtype=np.float32).reshape(-1, 1))
    ref, cur = w.take()
    assert ref[:, 0].tolist() == [0, 1, 2, 3, 4]  # the first rows seen
    assert cur[:, 0].tolist() == [101, 102, 103, 104]  # the last four, oldest first
    assert w.ref.nbytes + w.cur.nbytes == 9 * 4  # bounded whatever the stream length
    assert not w.ready()  # no new rows since the report


def test_column_names_follow_the_feature_vector() -> None:
    topo = synthetic_topology(SyntheticStream(n_features=3, n_binary=1, n_regression=0))
    assert topo.feature_columns() == ["f0", "f1", "f2"] and len(topo.feature_columns()) == topo.input_dim


def test_a_shifted_column_is_reported_and_only_the_newest_k_reports_are_kept(tmp_path) -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2000, 4)).astype(np.float32)
    cur = rng.normal(size=(2000, 4)).astype(np.float32)
    cur[:, 1] += 3.0  # one column moved
    for _ in range(3):
        summary = run_report(ref, cur, ["a", "b", "c", "d"], str(tmp_path), keep=2)
    run_report(ref, cur, ["a", "b", "c", "d"], str(tmp_path), keep=2, name="predictions-t")  # kept apart
    assert summary["drifted_columns"] == 1 and summary["drift_share"] == 0.25
    assert max(summary["columns"], key=lambda c: summary["columns"][c]["score"]) == "b"
    assert (
        len(list(tmp_path.glob("drift-features-*.html"))) == 2
        and len(list(tmp_path.glob("drift-features-*.json"))) == 2
    )
    assert len(list(tmp_path.glob("drift-predictions-t-*.html"))) == 1
    assert orjson.loads(sorted(tmp_path.glob("drift-features-*.json"))[-1].read_bytes())["html"].endswith(".html")


def test_the_runner_works_off_the_event_loop(tmp_path) -> None:
    async def main() -> tuple[dict, float]:
        w = FeatureWindows(["a", "b"], reference=500, current=200)
        w.add(np.random.default_rng(1).normal(size=(700, 2)))
        runner = ReportRunner({"features": w}, tmp_path, every_s=0, keep=3)
        assert runner.maybe_start()
        assert not runner.maybe_start()  # one at a time
        lag, t = 0.0, asyncio.get_running_loop().time()
        while "features" not in runner.last:  # the loop keeps turning while the child imports evidently and reports
            await asyncio.sleep(0.05)
            now = asyncio.get_running_loop().time()
            lag, t = max(lag, now - t - 0.05), now
        runner.close()
        return runner.last["features"], lag

    last, lag = asyncio.run(main())
    assert last["drifted_columns"] == 0 and last["current_rows"] == 200
    assert lag < 0.5, lag
