"""bench/kv.py and bench/threads.py end to end on the tiny Llama bundle: one command each, JSON + markdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(module: str, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_kv_bench_compares_in_place_and_plain(llama_bundle: Path, tmp_path: Path) -> None:
    _run("bench.kv", "--bundle", str(llama_bundle), "--contexts", "8", "40", "--steps", "4", "--repeats", "1",
         "--threads", "1", "--out", str(tmp_path), "--note", "test run")
    [report_file] = tmp_path.glob("kv-tiny-llama-fp32-*.json")
    report = json.loads(report_file.read_text())
    assert [r["context"] for r in report["rows"]] == [8, 40]
    for row in report["rows"]:
        assert row["inplace_ms"] > 0 and row["plain_ms"] > 0 and row["speedup"] > 0
    # The plain path's copy grows with the context: 2 layers x 2 (k, v) x kv_heads x head_dim x 4 bytes.
    assert report["rows"][1]["plain_copies_mb_per_step"] >= report["rows"][0]["plain_copies_mb_per_step"]
    text = report_file.with_suffix(".md").read_text()
    assert "test run" in text and text.count("\n| ") == 1 + len(report["rows"])


def test_threads_bench_runs_a_game_beside_the_replies(llama_bundle: Path, tmp_path: Path) -> None:
    _run("bench.threads", "--bundle", str(llama_bundle), "--replies", "1", "--repeats", "1", "--idle-s", "0.5",
         "--work-ms", "2", "--out", str(tmp_path))
    [report_file] = tmp_path.glob("threads-tiny-llama-fp32-*.json")
    report = json.loads(report_file.read_text())
    rows = {r["setting"]: r for r in report["rows"]}
    assert "game alone" in rows and "1 thread" in rows
    assert "tok_s" not in rows["game alone"] and rows["1 thread"]["tok_s"] > 0
    for row in rows.values():
        assert row["frames"] > 0 and 0 <= row["game_missed"] <= 1 and row["game_work_p99_ms"] >= row["game_work_p50_ms"] > 0
