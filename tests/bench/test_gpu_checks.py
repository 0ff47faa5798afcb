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


def test_parity_check_compares_prompts_read_together_with_one_by_one(llama_slots_bundle: Path) -> None:
    """On the CPU every path agrees; on the H100 the same check says whether the device's kernels do."""
    from bench.gpu_checks import parity

    report = parity(llama_slots_bundle, "cpu")
    assert report["together_vs_alone"] == 1.0 and report["graph_vs_plain"] == 1.0
    assert report["together_first_logits_max_diff"] < 1e-4 and report["graph_used"] is False


def test_decode_bench_reads_the_slots_prompts_together_or_one_by_one(gpt2_slots_bundle: Path) -> None:
    from bench.contenders import Settings, run_slots

    settings = Settings(prompt_tokens=8, new_tokens=4, threads=1)
    for together in (False, True):
        ttft, decode, e2e, details = run_slots(gpt2_slots_bundle, settings, 3, together=together)
        assert ttft > 0 and decode > 0 and e2e > 0 and details["cuda_graph"] is False


def test_snapshot_check_restores_prefixes_and_times_the_copies(gpt2_slots_bundle: Path, tmp_path: Path) -> None:
    """On the CPU the copy graphs' nodes run on the CPU provider and a restored half prompt gives the
    whole prompt's tokens; the copy times are measured beside the time to read the same prefix."""
    from bench.gpu_checks import snapshots

    report = snapshots(gpt2_slots_bundle, "cpu", tmp_path, repeats=3)
    assert report["take_nodes_by_provider"] == {"CPUExecutionProvider": 4} == report["put_nodes_by_provider"]
    assert report["restored_vs_whole"] == 1.0 and report["restored_first_logits_max_diff"] < 1e-4
    assert report["read_ms"] > 0 and report["restore_ms"] > 0 and report["snapshot_mb"] > 0
    assert report["copy_graphs"] is False  # the CPU copies with numpy; a GPU runs the graphs above


def test_reads_check_times_turns_alone_against_whole_prompts_together(gpt2_slots_bundle: Path) -> None:
    """Both ways of admitting a burst of says with a cached persona prefix give each say the same
    first token; the check times them (on the H100 it decides ``--group-cached-prompts``)."""
    from bench.gpu_checks import reads

    report = reads(gpt2_slots_bundle, "cpu", repeats=1, groups=(2, 3), prefix_tokens=40, turn_tokens=6)
    for n in (2, 3):
        says = report[f"says_{n}"]
        assert says["same_first_tokens"] is True
        assert says["alone_ms"] > 0 and says["together_ms"] > 0
        assert says["alone_over_together"] == round(says["alone_ms"] / says["together_ms"], 2)
