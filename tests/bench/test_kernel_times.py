"""bench/kernel_times.py: Nsight Compute's CSV read into kernel time per decode step (the GPU run is the lease's)."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench import kernel_times

CSV = '''==PROF== Connected to process 4242 (/usr/bin/python3)
==PROF== Profiling "gemv": 0%....50%....100% - 1 pass
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","4242","python3","127.0.0.1","gemv","1","13","(128, 1, 1)","(96, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","5,120"
"1","4242","python3","127.0.0.1","attention","1","13","(64, 1, 1)","(16, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","3.5"
"2","4242","python3","127.0.0.1","gemv","1","13","(128, 1, 1)","(96, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","4,880"
"3","4242","python3","127.0.0.1","attention","1","13","(64, 1, 1)","(16, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","2.5"
"3","4242","python3","127.0.0.1","attention","1","13","(64, 1, 1)","(16, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes.sum","byte","1024"
==PROF== Disconnected from process 4242
'''


def test_ncu_csv_becomes_launches_in_microseconds() -> None:
    launches = kernel_times.parse_ncu_csv(CSV)
    assert launches == [("gemv", 5.12), ("attention", 3.5), ("gemv", 4.88), ("attention", 2.5)]  # other metrics skipped
    assert kernel_times.parse_ncu_csv("==PROF== No kernels were profiled.\n") == []
    with pytest.raises(ValueError, match="unknown unit"):
        kernel_times.parse_ncu_csv(CSV.replace('"nsecond","5,120"', '"cycle","5120"'))


def test_summary_per_step_and_by_kernel() -> None:
    summary = kernel_times.summarize(kernel_times.parse_ncu_csv(CSV), steps=2, wall_us_per_step=16.0)
    assert summary["kernels_per_step"] == 2.0
    assert summary["kernel_us_per_step"] == pytest.approx(8.0)
    assert summary["kernel_share_of_wall"] == pytest.approx(0.5)
    first, second = summary["groups"]
    assert (first["kernel"], first["launches_per_step"], first["us_per_step"]) == ("gemv", 1.0, pytest.approx(5.0))
    assert second["kernel"] == "attention" and second["share"] == pytest.approx(6.0 / 16.0)
    text = kernel_times.markdown(summary, {"bundle": "b", "date": "d", "machine": {"cpu": "x86", "gpu": "GPU"},
                                           "streams": 1, "cuda_graph": True, "steps": 2, "warmup": 8})
    assert "d · GPU · 1 stream(s)" in text and "kernels busy 50% of it" in text and "| `gemv` | 1.0 | 5.0 | 5.00 | 62.5% |" in text
    with pytest.raises(ValueError, match="no kernel launches"):
        kernel_times.summarize([], steps=2, wall_us_per_step=None)


def test_missing_ncu_is_a_clear_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(kernel_times, "find_ncu", lambda: None)
    assert kernel_times.main(["--bundle", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "ncu (Nsight Compute) was not found" in caplog.text
    assert not (tmp_path / "out").exists()


def test_the_timed_steps_run_on_a_slots_bundle(gpt2_slots_bundle: Path) -> None:
    result = kernel_times.run_steps(gpt2_slots_bundle, streams=2, warmup=2, steps=3, graph=True, profile=False,
                                    provider="cpu")
    assert result["steps"] == 3 and result["streams"] == 2 and result["device"] == "cpu"
    assert result["cuda_graph"] is False  # a CPU session has no CUDA graph, whatever was asked
    assert 0 < result["wall_us_per_step"] < 5e6


FAKE_NCU = r'''#!/usr/bin/env bash
# Stands in for ncu: writes a CSV of two kernels per step to --log-file, then runs the program.
log=""; while [ "$1" != "{python}" ]; do [ "$1" = "--log-file" ] && {{ shift; log=$1; }}; shift; done
graph=yes; for a in "$@"; do [ "$a" = "--no-graph" ] && graph=no; done
echo "$@" >> "{calls}"
{{ echo '==PROF== Connected to process 1'
  echo '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"'
  if [ $graph = {kernels_with_graph} ]; then for i in 1 2 3 4; do
    echo '"0","1","python3","h","gemv","1","7","(1, 1, 1)","(1, 1, 1)","0","9.0","m","gpu__time_duration.sum","nsecond","3,000"'
    echo '"1","1","python3","h","attention","1","7","(1, 1, 1)","(1, 1, 1)","0","9.0","m","gpu__time_duration.sum","nsecond","1,000"'
  done; fi; }} > "$log"
exec "$@"
'''


@pytest.mark.parametrize("kernels_with_graph", ["yes", "no"])
def test_the_whole_run_with_a_stand_in_for_ncu(kernels_with_graph: str, gpt2_slots_bundle: Path, tmp_path: Path) -> None:
    import json
    import sys

    fake, calls = tmp_path / "ncu", tmp_path / "calls"
    fake.write_text(FAKE_NCU.format(python=sys.executable, calls=calls, kernels_with_graph=kernels_with_graph))
    fake.chmod(0o755)
    out = tmp_path / "out"
    assert kernel_times.main(["--bundle", str(gpt2_slots_bundle), "--streams", "2", "--steps", "4", "--warmup", "1",
                              "--ncu", str(fake), "--provider", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / f"kernel-times-{gpt2_slots_bundle.name}-2.json").read_text())
    assert report["kernels_per_step"] == 2.0 and report["kernel_us_per_step"] == pytest.approx(4.0)
    assert [g["kernel"] for g in report["groups"]] == ["gemv", "attention"]
    assert report["wall_us_per_step"] > 0 and report["meta"]["streams"] == 2
    runs = calls.read_text().splitlines()
    if kernels_with_graph == "yes":
        assert len(runs) == 1 and report["meta"]["note"] == ""
    else:  # nothing seen in the graph's replays: profiled again without the graph
        assert len(runs) == 2 and "--no-graph" in runs[1] and "without the graph" in report["meta"]["note"]
    assert (out / f"kernel-times-{gpt2_slots_bundle.name}-2.md").read_text().startswith("# Kernel time per decode step")
