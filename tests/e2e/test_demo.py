"""``stream-mtl demo``: embedded broker, worker process, producer, report — as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream_mtl",
            "demo",
            "--topology",
            "yeast",
            "--limit",
            "600",
            "--malformed",
            "3",
            "--run-dir",
            str(run_dir),
            "--timeout",
            "180",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = orjson.loads((run_dir / "metrics.json").read_bytes())
    assert metrics["events"] == 600 and metrics["dlq"] == 3
    assert len(metrics["tasks"]) == 14
    assert all(m["n"] == 600 and 0.0 <= m["f1"] <= 1.0 for m in metrics["tasks"].values())
    assert 0.0 < metrics["micro_f1"] < 1.0
    assert "class14" in proc.stdout and "micro-F1" in proc.stdout
    assert (run_dir / "report.md").read_text().startswith("# stream_mtl demo: yeast")
    html = (run_dir / "report.html").read_text()  # the plotted history of the run
    assert "class1 accuracy" in html and (run_dir / "metrics.jsonl").read_text().count("\n") >= 1
