"""The lean graph's slots layout (what CUDA runs): contract, validation, no shape arithmetic, options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from npctalk.engine.bundle import load_manifest
from npctalk.engine.errors import ConfigError, ExportError
from npctalk.export.api import ExportOptions, export_bundle


@pytest.fixture(params=["gpt2", "llama"])
def slots(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"{request.param}_slots_bundle")


def test_manifest_records_the_slots_contract(slots: Path) -> None:
    io = load_manifest(slots).io
    assert io["attention_mask"] is None
    assert (io["seqlens_k"], io["total_sequence_length"], io["next_token"]) == (
        "seqlens_k", "total_sequence_length", "next_token")


def test_validation_ran_parity_and_says_why_padding_is_not_checked(slots: Path) -> None:
    report = json.loads((slots / "validation.json").read_text())
    assert report["passed"] and report["top1_agreement"] == 1.0
    assert len(report["steps"]) == 9
    assert report["left_padding"]["supported"] is False
    assert "slots layout" in report["left_padding"]["reason"]


def test_graph_has_no_shape_arithmetic_and_no_attention_bias(slots: Path) -> None:
    """What CUDA graph capture needs: every node a compute kernel, no mask-derived tensors."""
    import onnx

    graph = onnx.load(str(slots / "model.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert "Shape" not in ops and "Expand" not in ops
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    # q (or packed qkv), k, v, past k, past v, seqlens_k, total (+ cos, sin): no position_ids, no bias
    assert gqa and all(len(n.input) in (7, 9) for n in gqa)
    if "model.embed_tokens.weight" in {t.name for t in graph.initializer}:  # Llama: the kernel rotates q and k
        assert "RotaryEmbedding" not in ops and "Split" in ops  # the MLP's gate/up split stays
        assert all({a.name: a.i for a in n.attribute}.get("do_rotary") == 1 and n.input[1] == "" for n in gqa)
        per_layer = [sum(n.name.startswith(f"/model/layers.{i}/") for n in graph.node) for i in range(len(gqa))]
        assert per_layer == [11] * len(gqa)  # 14 in the mask layout: Split and two RotaryEmbedding go
    assert [n.op_type for n in graph.node if "next_token" in n.output] == ["ArgMax"]
    inputs = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    assert inputs["seqlens_k"] == onnx.TensorProto.INT32 and inputs["total_sequence_length"] == onnx.TensorProto.INT32


def test_layout_options() -> None:
    assert ExportOptions(device="cuda").resolved_layout == "slots"
    assert ExportOptions().resolved_layout == "mask"
    assert ExportOptions(device="cuda", graph="optimum").resolved_layout == "mask"
    assert ExportOptions(layout="slots").resolved_layout == "slots"
    with pytest.raises(ConfigError, match="lean"):
        ExportOptions(graph="optimum", layout="slots")
    with pytest.raises(ConfigError, match="layout"):
        ExportOptions(layout="diagonal")


def test_a_bundle_of_the_other_layout_is_not_silently_reused(gpt2_slots_bundle: Path, tiny_gpt2_dir: Path) -> None:
    with pytest.raises(ExportError, match="slots layout"):
        export_bundle(tiny_gpt2_dir, gpt2_slots_bundle, ExportOptions(dtype="fp32", layout="mask"))
    assert export_bundle(tiny_gpt2_dir, gpt2_slots_bundle, ExportOptions(dtype="fp32", layout="slots")) == gpt2_slots_bundle


def test_fp16_slots_graph_validates_on_the_cpu(tiny_llama_dir: Path, tmp_path: Path) -> None:
    bundle = export_bundle(tiny_llama_dir, tmp_path / "fp16", ExportOptions(dtype="fp16", layout="slots"))
    manifest = load_manifest(bundle)
    assert manifest.kv_dtype == "fp16" and manifest.io["seqlens_k"] == "seqlens_k"
    assert json.loads((bundle / "validation.json").read_text())["passed"]
