"""optimize.py: fp16, int8 and int4 bundles of both families build, validate, and say what they hold."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from npctalk.engine.bundle import load_manifest
from npctalk.export.optimize import KEEP_FP32_NODES
from npctalk.export.validate import DECODE_STEPS, TOLERANCES


def _graph(bundle: Path) -> onnx.GraphProto:
    return onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph


def _report(bundle: Path) -> dict:
    return json.loads((bundle / "validation.json").read_text())


def test_int8_bundle_is_quantized_and_validates_with_top1_reported(int8_bundle: Path) -> None:
    manifest = load_manifest(int8_bundle)
    assert manifest.dtype == "int8" and manifest.kv_dtype == "fp32"
    ops = {n.op_type for n in _graph(int8_bundle).node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops, ops
    report = _report(int8_bundle)
    assert report["passed"] and report["dtype"] == "int8" and len(report["steps"]) == DECODE_STEPS + 1
    assert report["tolerance"]["atol"] == TOLERANCES["int8"].atol
    assert all(s["logits_max_abs_diff"] <= s["logits_limit"] for s in report["steps"])
    assert 0.0 <= report["top1_agreement"] <= 1.0 and all(isinstance(s["top1_match"], bool) for s in report["steps"])
    # Quantization really moved the numbers: this is not the fp32 graph under another name.
    assert max(s["logits_max_abs_diff"] for s in report["steps"]) > 1e-3


def test_int8_keeps_mlp_down_projections_in_fp32(int8_bundle: Path) -> None:
    nodes = _graph(int8_bundle).node
    kept = [n for n in nodes if KEEP_FP32_NODES.search(n.name) and n.op_type == "MatMul"]
    assert len(kept) == load_manifest(int8_bundle).num_layers
    assert not any(KEEP_FP32_NODES.search(n.name) for n in nodes if n.op_type == "MatMulInteger")


def test_fp16_bundle_has_fp16_cache_and_fp32_logits_and_validates_on_cpu(fp16_bundle: Path) -> None:
    manifest = load_manifest(fp16_bundle)
    graph = _graph(fp16_bundle)
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    assert manifest.dtype == "fp16" and manifest.kv_dtype == "fp16"
    assert types["past_key_values.0.key"] == types["present.0.value"] == onnx.TensorProto.FLOAT16
    assert types["logits"] == onnx.TensorProto.FLOAT
    assert types["input_ids"] == types["attention_mask"] == onnx.TensorProto.INT64
    # No LayerNormalization/MatMul left mixing float and float16 (the optimum fp16 trap).
    weights = [i for i in graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert sum(i.data_type == onnx.TensorProto.FLOAT16 for i in weights) > 0.9 * len(weights)
    report = _report(fp16_bundle)
    assert report["passed"] and report["provider"] == "CPUExecutionProvider"
    assert report["left_padding"]["supported"] and report["left_padding"]["max_abs_diff"] <= report["left_padding"]["limit"]
    assert 1e-5 < max(s["logits_max_abs_diff"] for s in report["steps"]) < TOLERANCES["fp16"].atol * 10


def test_smaller_graphs_than_fp32(int8_bundle: Path, fp16_bundle: Path, gpt2_bundle: Path) -> None:
    fp32 = (gpt2_bundle / "model.onnx").stat().st_size
    assert (fp16_bundle / "model.onnx").stat().st_size < 0.8 * fp32
    assert (int8_bundle / "model.onnx").stat().st_size < 0.8 * fp32


def test_gemm_rewrite_keeps_gpt2_logits(optimum_gpt2_bundle: Path, tmp_path: Path) -> None:
    """GPT-2's Gemm layers become MatMul + Add (quantizable) without changing a logit."""
    import numpy as np
    from npctalk.export.optimize import gemm_to_matmul
    from npctalk.export.validate import OnnxDecoder

    model = onnx.load(str(optimum_gpt2_bundle / "model.onnx"))
    assert gemm_to_matmul(model) == 4 * load_manifest(optimum_gpt2_bundle).num_layers
    assert not any(n.op_type == "Gemm" for n in model.graph.node)
    onnx.save(model, str(tmp_path / "model.onnx"))
    manifest = load_manifest(optimum_gpt2_bundle)
    ids, mask, pos = np.array([[3, 14, 15, 92, 65]]), np.ones((1, 5)), np.arange(5)[None]
    outputs = []
    for path in (optimum_gpt2_bundle / "model.onnx", tmp_path / "model.onnx"):
        dec = OnnxDecoder(path, manifest.io, manifest.num_layers)
        outputs.append(dec.step(ids, mask, pos, dec.empty_past(1))[0])
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8", "int4"])
def test_external_weights_layout(dtype: str, tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Big models keep weights in ``model.onnx.data``: forced here on a tiny one, through every step."""
    from npctalk.export import optimize
    from npctalk.export.api import ExportOptions, export_bundle

    monkeypatch.setenv("FORCE_ONNX_EXTERNAL_DATA", "1")  # optimum reads it at export time
    monkeypatch.setattr(optimize, "EXTERNAL_DATA_BYTES", 0)
    out = export_bundle(tiny_llama_dir, tmp_path / "b", ExportOptions(dtype=dtype))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["LICENSE.model", "manifest.json", "model.onnx", "model.onnx.data", "tokenizer.json", "validation.json"])
    assert (out / "model.onnx.data").stat().st_size > 64_000  # the weights really moved out
    assert _report(out)["passed"] and load_manifest(out).dtype == dtype


# --- int4 (MatMulNBits) -------------------------------------------------------------------------

def _constant_matmuls(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """MatMuls whose weight is an initializer, directly or through a Transpose (a tied LM head)."""
    inits = {i.name for i in graph.initializer}
    transposed = {n.output[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits}
    return [n for n in graph.node if n.op_type == "MatMul" and (n.input[1] in inits or n.input[1] in transposed)]


def test_int4_bundle_is_matmulnbits_everywhere_and_validates(int4_bundle: Path) -> None:
    from npctalk.export.optimize import INT4_BLOCK_SIZE, INT4_SENSITIVE_NODES

    manifest = load_manifest(int4_bundle)
    assert manifest.dtype == "int4" and manifest.kv_dtype == "fp32"
    graph = _graph(int4_bundle)
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    # Every linear layer and the LM head; no float weight MatMul is left. Per layer: GPT-2 has 4
    # (qkv, proj, fc, proj); Llama 7 in optimum's graph, 4 in the lean one (fused qkv and gate+up).
    per_layer = 4 if manifest.architecture == "gpt2" or manifest.graph == "lean" else 7
    assert len(nbits) == per_layer * manifest.num_layers + 1, [n.name for n in nbits]
    assert any("lm_head" in n.name for n in nbits)
    assert not _constant_matmuls(graph)
    for node in nbits:  # the LM head and MLP down projections carry 8-bit weights, the rest 4-bit
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["bits"] == (8 if INT4_SENSITIVE_NODES.search(node.name) else 4), node.name
        assert attrs["block_size"] == INT4_BLOCK_SIZE
    assert sum(bool(INT4_SENSITIVE_NODES.search(n.name)) for n in nbits) == manifest.num_layers + 1
    report = _report(int4_bundle)
    assert report["passed"] and report["dtype"] == "int4" and len(report["steps"]) == DECODE_STEPS + 1
    assert report["tolerance"]["atol"] == TOLERANCES["int4"].atol
    assert report["left_padding"]["supported"] and report["left_padding"]["max_abs_diff"] <= report["left_padding"]["limit"]
    # Really quantized: not the fp32 graph under another name.
    assert max(s["logits_max_abs_diff"] for s in report["steps"]) > 1e-3


def test_int4_greedy_decoding_runs_and_mostly_agrees_with_fp32(int4_bundle: Path, request: pytest.FixtureRequest) -> None:
    from npctalk.engine.generator import Generator, GeneratorParams
    from npctalk.engine.model import Model

    family = load_manifest(int4_bundle).architecture
    reference = request.getfixturevalue(f"{family}_bundle")
    replies = []
    for path in (reference, int4_bundle):
        model = Model(path, provider="cpu")
        params = GeneratorParams(model)
        params.set_search_options(max_new_tokens=12)
        gen = Generator(model, params)
        gen.append_tokens(model.tokenizer.encode("Hello traveller, welcome to the village"))
        while not gen.is_done():
            gen.generate_next_token()
        replies.append(gen.reply_tokens)
    fp32, int4 = replies
    assert 1 <= len(int4) <= 12 and all(0 <= t < load_manifest(int4_bundle).vocab_size for t in int4)
    assert int4[0] == fp32[0]  # the first greedy token survives 4-bit weights


def test_int4_graph_is_smaller_than_fp32(int4_bundle: Path, request: pytest.FixtureRequest) -> None:
    reference = request.getfixturevalue(f"{load_manifest(int4_bundle).architecture}_bundle")
    assert (int4_bundle / "model.onnx").stat().st_size < 0.8 * (reference / "model.onnx").stat().st_size


def test_untie_lm_head_keeps_llama_logits(optimum_llama_bundle: Path, tmp_path: Path) -> None:
    """A tied LM head gets its own transposed weight without changing a logit; the embedding stays."""
    import numpy as np
    from npctalk.export.optimize import untie_lm_head
    from npctalk.export.validate import OnnxDecoder

    model = onnx.load(str(optimum_llama_bundle / "model.onnx"))
    before = len(_constant_matmuls(model.graph))
    assert untie_lm_head(model) == 1
    assert not any(n.op_type == "Transpose" and n.input[0] in {i.name for i in model.graph.initializer}
                   for n in model.graph.node)
    assert len(_constant_matmuls(model.graph)) == before
    onnx.save(model, str(tmp_path / "model.onnx"))
    manifest = load_manifest(optimum_llama_bundle)
    ids, mask, pos = np.array([[3, 14, 15, 92, 65]]), np.ones((1, 5)), np.arange(5)[None]
    outputs = []
    for path in (optimum_llama_bundle / "model.onnx", tmp_path / "model.onnx"):
        dec = OnnxDecoder(path, manifest.io, manifest.num_layers)
        outputs.append(dec.step(ids, mask, pos, dec.empty_past(1))[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_int4_quantizes_the_lean_graph(family: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    from npctalk.export.api import ExportOptions, export_bundle
    from npctalk.export.optimize import INT4_SENSITIVE_NODES

    out = export_bundle(request.getfixturevalue(f"tiny_{family}_dir"), tmp_path / "lean-int4",
                        ExportOptions(dtype="int4", graph="lean"))
    graph = _graph(out)
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nbits and not _constant_matmuls(graph)
    assert any(INT4_SENSITIVE_NODES.search(n.name) for n in nbits) and any("lm_head" in n.name for n in nbits)
    assert _report(out)["passed"] and load_manifest(out).graph == "lean"
