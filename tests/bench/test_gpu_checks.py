"""bench/gpu_checks.py's TopK check, run on the CPU: it must see every node of the sampling path's
graphs and compare the bonused candidates with the host's (on the H100 it says whether any node
falls back to the CPU)."""

from __future__ import annotations

from pathlib import Path


def test_topk_check_reports_each_graph_s_nodes_and_the_bonused_parity(tmp_path: Path) -> None:
    from bench.gpu_checks import topk_placement

    report = topk_placement("cpu", tmp_path, vocab=5000, rows=4)
    assert report["topk"] == {"CPUExecutionProvider": 1}
    assert report["bonused_topk"] == {"CPUExecutionProvider": 3}  # Flatten, ScatterElements, TopK
    assert report["row"] == {"CPUExecutionProvider": 1}
    assert report["bonused_equals_host"] is True
