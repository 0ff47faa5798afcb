"""validate.py: ONNX-vs-PyTorch parity (prefill + 8 cached steps) and the left-padding check."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from npctalk.engine.bundle import load_manifest
from npctalk.engine.errors import ValidationError
from npctalk.export.validate import (
    DECODE_STEPS,
    PROMPT,
    TOLERANCES,
    OnnxDecoder,
    Tolerance,
    check_left_padding,
    tolerance_for,
    validate,
)


def _report(bundle: Path) -> dict:
    return json.loads((bundle / load_manifest(bundle).validation_file).read_text())


def _torch_model(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    ids = AutoTokenizer.from_pretrained(folder)(PROMPT, add_special_tokens=False)["input_ids"]
    return model, ids


def test_report_covers_prefill_and_eight_decode_steps_within_tolerance(bundle: Path) -> None:
    report = _report(bundle)
    assert [s["step"] for s in report["steps"]] == ["prefill"] + [f"decode {i}" for i in range(1, DECODE_STEPS + 1)]
    assert report["steps"][0]["tokens"] == report["prompt_tokens"] > 4
    assert all(s["tokens"] == 1 for s in report["steps"][1:])
    for s in report["steps"]:
        assert 0 <= s["logits_max_abs_diff"] <= s["logits_limit"], s
        assert 0 <= s["present_max_abs_diff"] <= s["present_limit"], s
        assert s["present_worst"].startswith("present.")
    # fp32 is exact to kernel order: far below the limit, not just under it.
    assert max(s["logits_max_abs_diff"] for s in report["steps"]) < 1e-4
    assert report["top1_agreement"] == 1.0
    assert report["passed"] is True and report["dtype"] == "fp32"
    assert report["tolerance"] == {"atol": TOLERANCES["fp32"].atol, "rtol": TOLERANCES["fp32"].rtol, "explicit_atol": False}


def test_left_padding_check_ran_and_passed(bundle: Path) -> None:
    padding = _report(bundle)["left_padding"]
    assert padding["supported"] is True and padding["pad_tokens"] >= 1
    assert padding["max_abs_diff"] <= padding["limit"]


def test_tolerance_limit_scales_with_reference_and_explicit_atol_is_absolute() -> None:
    tol = tolerance_for("fp32")
    assert tol.limit(0.0) == tol.atol and tol.limit(30.0) > tol.limit(1.0)
    assert tolerance_for("int8", atol=0.25) == Tolerance(0.25, 0.0)
    assert TOLERANCES["fp32"].limit(30) < TOLERANCES["fp16"].limit(30) < TOLERANCES["int8"].limit(30)


def _corrupt(src: Path, dst: Path, pattern: str) -> Path:
    """Copy a graph, adding noise (std 0.05) to one weight: a plausible-looking but wrong export.

    ``pattern`` matches an initializer name, or the name of the node that consumes the weight
    (the exporter names folded weights ``onnx::MatMul_123``).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    names = [n for n in inits if re.search(pattern, n)]
    names += [i for node in model.graph.node if re.search(pattern, node.name) for i in node.input if i in inits]
    init = inits[names[0]]
    weight = numpy_helper.to_array(init)
    noise = np.random.default_rng(0).normal(0.0, 0.05, weight.shape).astype(weight.dtype)
    init.CopyFrom(numpy_helper.from_array(weight + noise, init.name))
    onnx.save(model, str(dst))
    return dst


def test_corrupted_graph_fails_naming_output_step_and_difference(
    gpt2_bundle: Path, tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    manifest = load_manifest(gpt2_bundle)
    bad = _corrupt(gpt2_bundle / "model.onnx", tmp_path / "bad.onnx", r"^transformer\.wpe\.weight$")
    model, ids = _torch_model(tiny_gpt2_dir)
    decoder = OnnxDecoder(bad, manifest.io, manifest.num_layers)
    with pytest.raises(ValidationError) as info:
        validate(decoder, model, ids, manifest.pad_token_id, "fp32")
    message = str(info.value)
    assert "'logits'" in message and "at prefill" in message
    diff, limit = (float(x) for x in re.search(r"max \|diff\| ([\d.e+-]+) > limit ([\d.e+-]+)", message).groups())
    assert diff > limit > 0


def test_corrupted_cache_path_is_caught_in_present(llama_bundle: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A wrong value projection in the last layer shows up in that layer's present.value first
    (the lean graph fuses q|k|v into one weight, so there its present.key is hit too)."""
    manifest = load_manifest(llama_bundle)
    bad = _corrupt(llama_bundle / "model.onnx", tmp_path / "bad.onnx", r"layers\.1/self_attn/(v|qkv)_proj/MatMul")
    model, ids = _torch_model(tiny_llama_dir)
    with pytest.raises(ValidationError) as info:
        validate(OnnxDecoder(bad, manifest.io, manifest.num_layers), model, ids, manifest.pad_token_id, "fp32")
    # Layer 0's cache is untouched, so the worst cache output is exactly the corrupted one.
    assert ("also 'present.1.value' at prefill" if manifest.graph == "optimum" else "also 'present.1.") in str(info.value)
    assert "present.0" not in str(info.value)


def test_explicit_atol_zero_fails_int8(int8_bundle: Path, tiny_gpt2_dir: Path, tiny_llama_dir: Path) -> None:
    manifest = load_manifest(int8_bundle)
    model, ids = _torch_model(tiny_gpt2_dir if manifest.architecture == "gpt2" else tiny_llama_dir)
    decoder = OnnxDecoder(int8_bundle / "model.onnx", manifest.io, manifest.num_layers)
    with pytest.raises(ValidationError, match=r"differs from PyTorch at prefill: max \|diff\| .* > limit 0 \(--atol 0.0\)"):
        validate(decoder, model, ids, manifest.pad_token_id, "int8", atol=0.0)


def test_left_padding_detects_an_ignored_mask(gpt2_bundle: Path, tmp_path: Path) -> None:
    """The check is not vacuous: a decoder that drops attention_mask fails it."""
    manifest = load_manifest(gpt2_bundle)
    decoder = OnnxDecoder(gpt2_bundle / "model.onnx", manifest.io, manifest.num_layers)
    ids = list(range(5, 25))
    ok = check_left_padding(decoder, ids, manifest.pad_token_id, TOLERANCES["fp32"])
    assert ok["max_abs_diff"] <= ok["limit"]
    original = decoder.step
    decoder.step = lambda ids_, mask, pos, past: original(ids_, np.ones_like(mask), pos, past)  # type: ignore[method-assign]
    broken = check_left_padding(decoder, ids, manifest.pad_token_id, TOLERANCES["fp32"])
    assert broken["max_abs_diff"] > broken["limit"]


def test_graph_without_mask_inputs_reports_padding_unsupported(gpt2_bundle: Path) -> None:
    manifest = load_manifest(gpt2_bundle)
    decoder = OnnxDecoder(gpt2_bundle / "model.onnx", {**manifest.io, "attention_mask": None}, manifest.num_layers)
    assert check_left_padding(decoder, list(range(5, 15)), 0, TOLERANCES["fp32"])["supported"] is False


def test_cuda_probe_agrees_with_a_real_session(gpt2_bundle: Path) -> None:
    """``cuda_usable`` (the early check) and the validation session agree about CUDA."""
    from npctalk.engine.errors import ExportError
    from npctalk.export.validate import cuda_usable

    manifest = load_manifest(gpt2_bundle)
    if cuda_usable():
        assert OnnxDecoder(gpt2_bundle / "model.onnx", manifest.io, 2, device="cuda").provider == "CUDAExecutionProvider"
    else:
        with pytest.raises(ExportError, match="--device cuda"):
            OnnxDecoder(gpt2_bundle / "model.onnx", manifest.io, 2, device="cuda")
