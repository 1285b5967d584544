"""The run history is bounded, and the HTML report shows interval metrics with drift markers."""

from __future__ import annotations

from stream_mtl.run_report import MetricsHistory, _interval, write_report


def snap(i: int, acc: float, n: int, drift: int) -> dict:
    return {
        "ts": 1000.0 + i,
        "events": n,
        "tasks": {"a": {"accuracy": acc, "f1": acc, "n": n}, "r": {"mae": 1.0, "rmse": 1.2, "n": n}},
        "drift": {"a": {"alerts": drift}, "r": {"alerts": 0}},
        "batch_composition": {"a": 30, "r": 10},
        "task_weights": {"a": 1.0, "r": 0.5},
    }


def test_the_history_keeps_at_most_max_lines(tmp_path) -> None:
    h = MetricsHistory(tmp_path / "metrics.jsonl", max_lines=10)
    for i in range(25):
        h.append(snap(i, 0.9, 100 * (i + 1), 0))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) <= 10 and '"ts":1024.0' in lines[-1]
    assert MetricsHistory(tmp_path / "metrics.jsonl", max_lines=10).lines == len(lines)  # a restart counts them


def test_the_interval_metric_is_recovered_from_running_means() -> None:
    # 100 events at 0.9, then 100 more at 0.5: the running mean says 0.7, the interval 0.5
    assert _interval({"accuracy": 0.9, "n": 100}, {"accuracy": 0.7, "n": 200}, "accuracy") == 0.5


def test_the_report_has_every_task_and_a_marker_per_drift(tmp_path) -> None:
    h = MetricsHistory(tmp_path / "metrics.jsonl")
    for i in range(20):
        h.append(snap(i, 0.9 if i < 10 else 0.6, 100 * (i + 1), 0 if i < 11 else 1))
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "drift-20261204T000000-000.html").write_text("<html></html>")
    html = write_report(tmp_path, {"a": "binary", "r": "regression"}).read_text()
    assert "a accuracy" in html and "r mae" in html and "a drift" in html and "r drift" not in html
    assert "drift-20261204T000000-000.html" in html and "2,000 events" in html
