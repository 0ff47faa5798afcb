"""bench/concurrency.py end to end on the tiny GPT-2 slots bundle: a real server, one burst and a steady state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _bench(bundle: Path, out: Path, *args: str) -> dict:
    command = [sys.executable, "bench/concurrency.py", "--model", str(bundle), "--provider", "cpu", "--streams", "1", "3",
               "--max-new-tokens", "12", "--slot-context", "400", "--out", str(out), *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [report] = out.glob("concurrency-*.json")
    return json.loads(report.read_text())


def test_one_burst_counts_every_reply(gpt2_slots_bundle: Path, tmp_path: Path) -> None:
    report = _bench(gpt2_slots_bundle, tmp_path, "--tag", "burst")
    assert [level["streams"] for level in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["completion_tokens"] == 12 * level["streams"]  # greedy, no EOS: every reply runs to length
        assert level["aggregate_tok_s"] > 0 and level["ttft_ms_p50"] > 0
    assert report["steady_window_s"] is None


def test_steady_state_counts_the_servers_tokens_over_its_window(gpt2_slots_bundle: Path, tmp_path: Path) -> None:
    """Streams say again as their replies end: several replies per stream fit in the window, and the
    rate is the server's token count over the window, not one burst's."""
    report = _bench(gpt2_slots_bundle, tmp_path, "--steady", "1.5", "--warmup", "0.5", "--tag", "steady")
    assert report["steady_window_s"] == 1.5 and any(tmp_path.glob("*-steady-steady.md"))
    for level in report["levels"]:
        assert level["mode"] == "steady" and 1.4 < level["window_s"] < 3.0
        assert level["replies_in_window"] > level["streams"]  # each stream answered more than once
        # The report rounds the window to 1 ms: at ~5k tok/s that alone moves the quotient by ~1.5 tok/s.
        assert level["aggregate_tok_s"] == pytest.approx(level["completion_tokens"] / level["window_s"], rel=1e-3)
        assert level["gap_ms_p50"] > 0
