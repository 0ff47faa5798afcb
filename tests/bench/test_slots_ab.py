"""bench/slots_ab.py on the tiny Llama slots bundle against itself: one command, JSON + markdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_slots_ab_times_both_bundles_in_turn_and_checks_their_tokens(llama_slots_bundle: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.slots_ab", "--a", str(llama_slots_bundle), "--b",
                           str(llama_slots_bundle), "--streams", "1", "3", "--rounds", "2", "--steps", "4",
                           "--prompt-tokens", "6", "--threads", "1", "--out", str(tmp_path), "--tag", "test"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [report_file] = tmp_path.glob("slots-ab-tiny-llama-fp32-cpu-*-test.json")
    report = json.loads(report_file.read_text())
    assert [r["streams"] for r in report["rows"]] == [1, 3]
    for row in report["rows"]:
        assert row["token_agreement"] == 1.0 and row["a_ms"] > 0 and row["b_ms"] > 0
        assert len(row["rounds_ms"]["a"]) == len(row["rounds_ms"]["b"]) == 2
    assert report["nodes"]["a"] == report["nodes"]["b"] > 0
    assert report_file.with_suffix(".md").read_text().count("\n| ") == 1 + len(report["rows"])
