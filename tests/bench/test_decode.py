"""bench/decode.py end to end at a tiny size: one command, JSON + markdown, our rows and the peers'."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_decode_bench_runs_end_to_end_with_peers(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("optimum.onnxruntime")
    out, work = tmp_path / "results", tmp_path / "work"
    command = [sys.executable, "-m", "bench.decode", "--models", "tiny-gpt2", "tiny-llama", "--dtypes", "fp32", "int4",
               "--graphs", "optimum", "--streams", "1", "3", "--prompt-tokens", "8", "--new-tokens", "6",
               "--peers", "hf", "optimum", "--threads", "1", "--no-default", "--work", str(work), "--out", str(out),
               "--bandwidth-gbs", "10"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    [report_file] = out.glob("decode-cpu-*.json")
    report = json.loads(report_file.read_text())
    assert report_file.with_suffix(".md").read_text().count("| tiny-") == len(report["rows"])
    assert report["settings"]["new_tokens"] == 6 and report["settings"]["prompt_tokens"] == 8
    assert report["bandwidth_gbs"] == 10 and report["skipped"] == []
    rows = {(r["model"], r["engine"], r["dtype"], r["streams"]): r for r in report["rows"]}
    for model in ("tiny-gpt2", "tiny-llama"):
        for streams in (1, 3):
            for key in [("npctalk", "fp32"), ("npctalk", "int4"), ("hf-pytorch", "fp32"), ("optimum-ort", "fp32")]:
                row = rows[(model, *key, streams)]
                assert row["ttft_ms"] > 0 and row["decode_tok_s"] > 0 and row["e2e_tok_s"] > 0
                assert row["bound_tok_s"] > 0
    # The bound scales with the streams: weights are read once per step for all of them.
    one, three = rows[("tiny-gpt2", "npctalk", "fp32", 1)], rows[("tiny-gpt2", "npctalk", "fp32", 3)]
    assert three["bound_tok_s"] == pytest.approx(3 * one["bound_tok_s"], rel=1e-3)
    # Progress went through logging (stderr), the table to stdout.
    assert "tiny-llama · npctalk int4" in done.stderr and "| model | engine |" in done.stdout


def test_cuda_skips_cleanly_without_a_gpu(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA path runs for real")
    done = subprocess.run([sys.executable, "-m", "bench.decode", "--device", "cuda", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "skipping" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_cpu_bandwidth_is_measured() -> None:
    sys.path.insert(0, str(REPO))
    from bench.decode import cpu_bandwidth_gbs

    assert 0.1 < cpu_bandwidth_gbs(megabytes=64, repeats=2) < 10_000
