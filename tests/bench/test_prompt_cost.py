"""bench/prompt_cost.py end to end on the tiny Llama bundle: prompts and whole says, both ways, timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_prompt_cost_times_both_ways_for_each_history(llama_bundle: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.prompt_cost", "--bundle", str(llama_bundle), "--turns", "0", "4",
                           "--says", "3", "--rounds", "1", "--out", str(tmp_path), "--tag", "test"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [report_file] = tmp_path.glob("prompt-cost-*-test.json")
    report = json.loads(report_file.read_text())
    rows = report["rows"]
    assert [r["turns"] for r in rows] == [0, 4]
    assert rows[1]["prompt_tokens"] > rows[0]["prompt_tokens"]  # the history is in the prompt
    for row in rows:
        assert row["tokenized_ms"] > 0 and row["cached_ms"] > 0
        assert row["speedup"] == round(row["tokenized_ms"] / row["cached_ms"], 1)
    handle = report["handle"]  # a whole say through the handler, both ways, and accepted (else the bench fails)
    assert handle["uncached_ms"] > 0 and handle["cached_ms"] > 0
