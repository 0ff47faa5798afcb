"""convert.py: one graph with KV cache whose inputs match the manifest, and which honours the mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from npctalk.engine.bundle import DEFAULT_IO, load_manifest
from npctalk.engine.errors import ExportError
from npctalk.export.convert import describe_graph
from npctalk.export.validate import OnnxDecoder


def _inputs(bundle: Path) -> dict[str, int]:
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    return {i.name: i.type.tensor_type.elem_type for i in graph.input}


def test_manifest_io_states_exactly_the_graph_inputs(bundle: Path) -> None:
    manifest = load_manifest(bundle)
    inputs = _inputs(bundle)
    expected = {manifest.io["input_ids"], manifest.io["attention_mask"], manifest.io["position_ids"]}
    for layer in range(manifest.num_layers):
        expected |= {manifest.io["past_key"].format(layer=layer), manifest.io["past_value"].format(layer=layer)}
    assert set(inputs) == expected
    # Both families take attention_mask and position_ids (the runtime batches left-padded streams).
    assert manifest.io["attention_mask"] == "attention_mask" and manifest.io["position_ids"] == "position_ids"
    assert manifest.kv_dtype == "fp32" and inputs["past_key_values.0.key"] == onnx.TensorProto.FLOAT


def test_describe_graph_reports_missing_optional_inputs_as_none(gpt2_bundle: Path, tmp_path: Path) -> None:
    """A graph lacking position_ids gets io["position_ids"] = None, not a name the runtime would feed."""
    model = onnx.load(str(gpt2_bundle / "model.onnx"))
    pos = next(i for i in model.graph.input if i.name == "position_ids")
    model.graph.input.remove(pos)
    zeros = onnx.helper.make_node("ConstantOfShape", ["pos_shape"], ["position_ids"],
                                  value=onnx.helper.make_tensor("v", onnx.TensorProto.INT64, [1], [0]))
    shape = onnx.helper.make_node("Shape", ["input_ids"], ["pos_shape"])
    model.graph.node.insert(0, zeros)
    model.graph.node.insert(0, shape)
    onnx.save(model, str(tmp_path / "model.onnx"))
    graph = describe_graph(tmp_path / "model.onnx", 2)
    assert graph.io["position_ids"] is None and graph.io["attention_mask"] == "attention_mask"
    assert graph.io == {**DEFAULT_IO, "position_ids": None, "seqlens_k": None, "total_sequence_length": None,
                        "next_token": None}  # the mask layout: no slots roles


def test_describe_graph_refuses_a_graph_without_cache(gpt2_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"lacks \[.past_key_values\.2\.key"):
        describe_graph(gpt2_bundle / "model.onnx", 4)


def _decoder(bundle: Path) -> OnnxDecoder:
    manifest = load_manifest(bundle)
    return OnnxDecoder(bundle / "model.onnx", manifest.io, manifest.num_layers)


def test_gpt2_left_padded_batch_equals_single_stream(gpt2_bundle: Path) -> None:
    """Batch of 2 with 3 left pads on row 0 vs row 0's tokens alone: same logits, prefill and decode.

    A lean graph returns the last position only; then the last positions are compared.
    """
    dec = _decoder(gpt2_bundle)
    short, long = [11, 42, 7, 99, 23], [5, 6, 7, 8, 9, 10, 12, 13]
    single, past1 = dec.step(np.array([short]), np.ones((1, 5)), np.arange(5)[None], dec.empty_past(1))
    mask = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    pos = np.array([[1, 1, 1, 0, 1, 2, 3, 4], list(range(8))])
    batch, past2 = dec.step(np.array([[0, 0, 0, *short], long]), mask, pos, dec.empty_past(2))
    np.testing.assert_allclose(batch[0, -single.shape[1]:], single[0], atol=1e-5)
    # One cached decode step with the same next token on both rows.
    nxt = np.array([[17]])
    single2, _ = dec.step(nxt, np.ones((1, 6)), np.array([[5]]), past1)
    batch2, _ = dec.step(np.array([[17], [17]]), np.concatenate([mask, np.ones((2, 1))], 1), np.array([[5], [8]]), past2)
    np.testing.assert_allclose(batch2[0], single2[0], atol=1e-5)


def test_gpt2_graph_really_uses_mask_and_positions(gpt2_bundle: Path) -> None:
    """GPT-2 has absolute position embeddings: shifting position_ids, or masking a token, changes logits."""
    dec = _decoder(gpt2_bundle)
    ids = np.array([[11, 42, 7, 99, 23]])
    base, _ = dec.step(ids, np.ones((1, 5)), np.arange(5)[None], dec.empty_past(1))
    shifted, _ = dec.step(ids, np.ones((1, 5)), np.arange(5)[None] + 7, dec.empty_past(1))
    masked, _ = dec.step(ids, np.array([[0, 1, 1, 1, 1]]), np.arange(5)[None], dec.empty_past(1))
    assert np.abs(shifted - base).max() > 1e-2
    assert np.abs(masked[0, -1] - base[0, -1]).max() > 1e-2  # the last position (all a lean graph returns)
