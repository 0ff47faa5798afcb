"""bench/host_cost.py end to end at a tiny size: the stand-in is built, both time shares are reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_host_cost_splits_each_step_into_host_and_model_time(default_bundle: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.host_cost", "--streams", "2", "5", "--rounds", "1",
                           "--new-tokens", "6", "--prompt-tokens", "300", "--tokenizer-bundle", str(default_bundle), "--work", str(tmp_path / "work"),
                           "--out", str(tmp_path / "out"), "--tag", "test"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [report_file] = (tmp_path / "out").glob("host-cost-*-test.json")
    report = json.loads(report_file.read_text())
    assert [r["streams"] for r in report["rows"]] == [2, 5] and report["prompt_tokens"] == 300
    for row in report["rows"]:
        assert row["host_ms_step"] > 0 and row["ort_ms_step"] > 0 and row["steps"] >= 5
        assert 0 < row["tokens"] <= 6 * row["streams"]
        assert abs(row["wall_ms_step"] - row["host_ms_step"] - row["ort_ms_step"]) < 1e-2
    assert "host µs/token" in report_file.with_suffix(".md").read_text()
