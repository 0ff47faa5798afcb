"""export-onnx's main(): every bad input gives one clear ``error:`` line and the right exit code."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from npctalk.engine.bundle import MANIFEST_NAME, load_manifest


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:") or ": error:" in line]


def _no_partials(parent: Path) -> bool:
    return not any(".partial-" in p.name or ".old-" in p.name for p in parent.iterdir())


def test_success_prints_bundle_path_and_logs_every_stage(run_cli, tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    result = run_cli(tiny_llama_dir, "-o", out, "--dtype", "fp32")
    assert result.code == 0, result.err
    assert result.out.strip() == str(out)
    for n, stage in enumerate(["resolving", "loading", "exporting", "converting", "validating", "writing", "publishing"], 1):
        assert f"[{n}/7] {stage}" in result.err
    assert "Bundle ready" in result.err and not _error_lines(result.err)
    assert load_manifest(out).architecture == "llama"
    # Second call: the cached bundle is returned at once.
    start = time.monotonic()
    again = run_cli(tiny_llama_dir, "-o", out)
    assert again.code == 0 and "already exists" in again.err and "[2/7]" not in again.err
    assert time.monotonic() - start < 5


def test_graph_flag_picks_the_builder(run_cli, tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    result = run_cli(tiny_gpt2_dir, "-o", tmp_path / "lean", "--graph", "lean")
    assert result.code == 0, result.err
    assert "[3/7] exporting the lean ONNX graph" in result.err and load_manifest(tmp_path / "lean").graph == "lean"
    assert "--graph" in run_cli("--help").out


def test_missing_folder(run_cli, tmp_path: Path) -> None:
    result = run_cli(tmp_path / "nope", "-o", tmp_path / "out")
    assert result.code == 1
    assert _error_lines(result.err) == [f"error: No such folder: {tmp_path / 'nope'}. Pass a Hugging Face model folder, "
                                        "a hub id or 'default'."]
    assert not (tmp_path / "out").exists() and _no_partials(tmp_path)


@pytest.mark.parametrize("fixture, model_type", [("tiny_bert_dir", "bert"), ("tiny_t5_dir", "t5")])
def test_unsupported_architecture(run_cli, request: pytest.FixtureRequest, fixture: str, model_type: str, tmp_path: Path) -> None:
    result = run_cli(request.getfixturevalue(fixture), "-o", tmp_path / "out")
    assert result.code == 1
    [line] = _error_lines(result.err)
    assert f"is a '{model_type}' model" in line and "GPT-2" in line and "Llama" in line
    assert not (tmp_path / "out").exists() and _no_partials(tmp_path)


def test_hub_id_without_network(run_cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    result = run_cli("microsoft/DialoGPT-small", "-o", tmp_path / "out")
    assert result.code == 1
    [line] = _error_lines(result.err)
    assert "microsoft/DialoGPT-small" in line and "pass a local folder" in line


@pytest.mark.parametrize("argv, message", [
    (["x", "--dtype", "int3"], "invalid choice: 'int3'"),
    (["x", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["x", "--graph", "fast"], "invalid choice: 'fast'"),
    (["x", "--atol", "-1"], "--atol must be >= 0"),
    (["x", "--atol", "lots"], "invalid float value"),
    ([], "the following arguments are required: SOURCE"),
])
def test_usage_errors_exit_2(run_cli, argv: list[str], message: str) -> None:
    result = run_cli(*argv)
    assert result.code == 2 and message in result.err and "usage: export-onnx" in result.err


def test_help_exits_0(run_cli) -> None:
    result = run_cli("--help")
    assert result.code == 0 and "--dtype" in result.out and "default" in result.out


def test_incomplete_output_folder_is_refused_without_force(run_cli, tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "half"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"half a graph")
    result = run_cli(tiny_gpt2_dir, "-o", out)
    assert result.code == 1
    [line] = _error_lines(result.err)
    assert "is not a complete bundle" in line and "--force" in line
    assert (out / "model.onnx").read_bytes() == b"half a graph"
    forced = run_cli(tiny_gpt2_dir, "-o", out, "--force")
    assert forced.code == 0, forced.err
    assert load_manifest(out).architecture == "gpt2" and _no_partials(tmp_path)


def test_existing_bundle_of_another_dtype_is_not_silently_reused(run_cli, gpt2_bundle: Path) -> None:
    result = run_cli(gpt2_bundle.parent / "nothing-here", "-o", gpt2_bundle)
    assert result.code == 1 and "already holds a bundle" in result.err
    result = run_cli(load_manifest(gpt2_bundle).source.id, "-o", gpt2_bundle, "--dtype", "int8")
    assert result.code == 1 and f"(fp32, cpu, {load_manifest(gpt2_bundle).graph} graph, mask layout), not" in result.err and "--force" in result.err


def test_disk_full_removes_the_partial_folder(run_cli, tiny_gpt2_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from npctalk.export import api

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(api, "write_tokenizer_json", full)
    result = run_cli(tiny_gpt2_dir, "-o", tmp_path / "out")
    assert result.code == 1
    [line] = _error_lines(result.err)
    assert line.startswith("error: Disk full while writing the bundle") and "partial export was removed" in line
    assert not (tmp_path / "out").exists() and _no_partials(tmp_path)


def test_interrupted_export_leaves_no_manifest(run_cli, tiny_gpt2_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from npctalk.export import api

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "validate", ctrl_c)
    result = run_cli(tiny_gpt2_dir, "-o", tmp_path / "out")
    assert result.code == 130 and "interrupted" in result.err
    assert not (tmp_path / "out").exists() and _no_partials(tmp_path)


def test_killed_export_never_looks_complete_and_is_cleaned_up(run_cli, tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """SIGKILL mid-export (no cleanup can run): the output path holds nothing; the next export removes the debris."""
    out = tmp_path / "out"
    code = ("import sys, npctalk.export.api as api\n"
            "def hang(*a, **k):\n    open(sys.argv[2], 'w').close()\n    import time; time.sleep(60)\n"
            "api.validate = hang\n"
            "from npctalk.export.cli import main\nmain([sys.argv[1], '-o', sys.argv[3]])\n")
    marker = tmp_path / "validating"
    proc = subprocess.Popen([sys.executable, "-c", code, str(tiny_gpt2_dir), str(marker), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "export subprocess ended early"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    partials = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert partials and (partials[0] / "model.onnx").exists() and not (partials[0] / MANIFEST_NAME).exists()
    assert not out.exists()
    result = run_cli(tiny_gpt2_dir, "-o", out)
    assert result.code == 0 and "left by an interrupted export" in result.err
    assert load_manifest(out) and _no_partials(tmp_path)
