"""block_grid.py: weights already on a Q4_1 / Q8_0 grid (a GGUF source) reach MatMulNBits exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from npctalk.engine.bundle import load_manifest
from npctalk.export.block_grid import BLOCK, import_grid_weights, recover, recover_q4_1

ORT_OPSETS = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]


def q4_1_weight(k: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A (K, N) float32 weight as a Q4_1 GGUF de-quantizes: d * q + m, fp16 d and m, q spanning 0..15."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, size=(n, k // BLOCK, BLOCK))
    q[..., 0], q[..., 1] = 0, 15                     # llama.cpp maps each block's min to 0 and max to 15
    d = rng.uniform(0.001, 0.05, size=(n, k // BLOCK, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.4, 0.0, size=(n, k // BLOCK, 1)).astype(np.float16).astype(np.float32)
    w = (d * q.astype(np.float32) + m).reshape(n, k)
    return np.ascontiguousarray(w.T), q.reshape(n, k)


def q8_0_weight(k: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, size=(n, k // BLOCK, BLOCK))
    q[..., 0] = 127
    d = rng.uniform(0.001, 0.01, size=(n, k // BLOCK, 1)).astype(np.float16).astype(np.float32)
    return np.ascontiguousarray((d * q.astype(np.float32)).reshape(n, k).T)


def unpack(grid, k: int) -> np.ndarray:
    """The float (K, N) weight a MatMulNBits node with these tensors computes with (its default zero point)."""
    n = grid.packed.shape[0]
    if grid.bits == 4:
        q = np.stack([grid.packed & 0x0F, grid.packed >> 4], axis=-1).reshape(n, k).astype(np.float64)
        zero = 8.0
    else:
        q, zero = grid.packed.reshape(n, k).astype(np.float64), 128.0
    scales = np.repeat(grid.scales.reshape(n, k // BLOCK).astype(np.float64), BLOCK, axis=1)
    w = scales * (q - zero)
    if grid.correction is not None:
        w += np.repeat(grid.correction.T.astype(np.float64), BLOCK, axis=1)
    return w.T


def test_a_q4_1_weight_is_recovered_exactly() -> None:
    w, q = q4_1_weight(96, 40)
    grid = recover_q4_1(w)
    assert grid is not None and grid.bits == 4 and grid.packed.shape == (40, 3, 16)
    np.testing.assert_array_equal(np.stack([grid.packed & 0x0F, grid.packed >> 4], -1).reshape(40, 96), q)
    np.testing.assert_allclose(unpack(grid, 96), w, rtol=0, atol=1e-6 * np.abs(w).max())


def test_a_q8_0_weight_is_recovered_exactly_and_is_not_taken_for_q4_1() -> None:
    w = q8_0_weight(64, 24)
    assert recover_q4_1(w) is None
    grid = recover(w)
    assert grid is not None and grid.bits == 8 and grid.correction is None
    np.testing.assert_allclose(unpack(grid, 64), w, rtol=0, atol=1e-6 * np.abs(w).max())


def test_weights_off_the_grid_are_left_alone() -> None:
    rng = np.random.default_rng(1)
    assert recover(rng.standard_normal((64, 32)).astype(np.float32)) is None
    w, _ = q4_1_weight(64, 32)
    w[5, 7] += 1e-3                                          # one value off its block's grid
    assert recover(w) is None
    assert recover(q4_1_weight(64, 32)[0].astype(np.float64)) is None   # only float32 weights
    assert recover(np.zeros((48, 8), np.float32)) is None                 # K not a multiple of 32


def test_constant_blocks_survive() -> None:
    w, _ = q4_1_weight(64, 8)
    w[:32, 3] = np.float32(-0.125)                           # d = 0: the block is its minimum
    grid = recover_q4_1(w)
    assert grid is not None
    np.testing.assert_allclose(unpack(grid, 64), w, rtol=0, atol=1e-6)


def _matmul_model(weights: dict[str, np.ndarray], k: int) -> onnx.ModelProto:
    """Two MatMuls on the same x (a, b) and one on its square (c): (1, 3, K) → three outputs."""
    nodes = [helper.make_node("Mul", ["x", "x"], ["x2"], "square"),
             helper.make_node("MatMul", ["x", "a"], ["ya"], "/a/MatMul"),
             helper.make_node("MatMul", ["x", "b"], ["yb"], "/b/MatMul"),
             helper.make_node("MatMul", ["x2", "c"], ["yc"], "/c/MatMul")]
    outputs = [helper.make_tensor_value_info(f"y{name}", TensorProto.FLOAT, None) for name in "abc"]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, k])], outputs,
                              [numpy_helper.from_array(w, name) for name, w in weights.items()])
    return helper.make_model(graph, ir_version=10, opset_imports=ORT_OPSETS[:1])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_import_rewrites_grid_matmuls_and_keeps_their_outputs() -> None:
    k = 128
    weights = {"a": q4_1_weight(k, 48, seed=2)[0], "b": q4_1_weight(k, 16, seed=3)[0],
               "c": np.random.default_rng(4).standard_normal((k, 8)).astype(np.float32)}
    model = _matmul_model(weights, k)
    x = np.random.default_rng(5).standard_normal((1, 3, k)).astype(np.float32)
    before = _run(model, x)
    counts = import_grid_weights(model, accuracy_level=0)
    assert counts == {"exact_4bit": 2, "exact_8bit": 0, "exact_gather": 0}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("ReduceSum") == 1   # one block sum for the shared x
    assert [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] == "c"] == ["/c/MatMul"]
    inits = {i.name for i in model.graph.initializer}
    assert "a" not in inits and "b" not in inits and "c" in inits
    after = _run(model, x)
    for old, new in zip(before, after):
        np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-5 * np.abs(old).max())


def test_import_of_a_q8_0_head_uses_8_bits_with_no_correction() -> None:
    k = 64
    weights = {"a": q8_0_weight(k, 40), "b": q4_1_weight(k, 8)[0], "c": q4_1_weight(k, 8, seed=9)[0]}
    model = _matmul_model(weights, k)
    x = np.random.default_rng(6).standard_normal((1, 3, k)).astype(np.float32)
    before = _run(model, x)
    assert import_grid_weights(model, accuracy_level=0) == {"exact_4bit": 2, "exact_8bit": 1, "exact_gather": 0}
    head = next(n for n in model.graph.node if n.output[0] == "ya")
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    assert head.op_type == "MatMulNBits" and attrs["bits"] == 8
    for old, new in zip(before, _run(model, x)):
        np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-5 * np.abs(old).max())


def test_a_q8_0_embedding_gather_becomes_gather_block_quantized() -> None:
    table = np.ascontiguousarray(q8_0_weight(64, 50, seed=7).T)          # (vocab 50, hidden 64)
    off_grid = np.random.default_rng(8).standard_normal((50, 64)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["y"], "/embed/Gather"),
             helper.make_node("Gather", ["other", "ids"], ["z"], "/other/Gather")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in "yz"],
                              [numpy_helper.from_array(table, "emb"), numpy_helper.from_array(off_grid, "other")])
    model = helper.make_model(graph, ir_version=10, opset_imports=ORT_OPSETS[:1])
    assert import_grid_weights(model, accuracy_level=4) == {"exact_4bit": 0, "exact_8bit": 0, "exact_gather": 1}
    assert [n.op_type for n in model.graph.node] == ["GatherBlockQuantized", "Gather"]
    import onnxruntime as ort

    ids = np.array([[0, 7, 49, 7]])
    y, z = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})
    np.testing.assert_allclose(y[0], table[ids[0]], rtol=0, atol=1e-6 * np.abs(table).max())
    np.testing.assert_array_equal(z[0], off_grid[ids[0]])


# --- a GGUF-like model end to end ------------------------------------------------------------------

@pytest.fixture(scope="module")
def grid_llama_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with every linear weight snapped to Q4_1 blocks and the tied embedding to Q8_0,
    as loading a Q4_1 GGUF produces."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
                module.weight.copy_(torch.from_numpy(_snap_q4_1(module.weight.numpy())))
        emb = model.model.embed_tokens.weight
        emb.copy_(torch.from_numpy(_snap_q8_0(emb.numpy())))
    folder = tmp_path_factory.mktemp("hf") / "grid-llama"
    model.save_pretrained(folder)
    for path in tiny_llama_dir.iterdir():                    # tokenizer and chat template files
        if path.is_file() and not (folder / path.name).exists():
            shutil.copy(path, folder / path.name)
    return folder


def _snap_q4_1(w_out_in: np.ndarray) -> np.ndarray:
    blocks = w_out_in.reshape(w_out_in.shape[0], -1, BLOCK)
    low = blocks.min(-1, keepdims=True).astype(np.float16).astype(np.float32)
    d = ((blocks.max(-1, keepdims=True) - low) / 15).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint((blocks - low) / np.where(d > 0, d, 1)), 0, 15)
    q[..., :1], q[..., 1:2] = 0, 15
    return (d * q + low).reshape(w_out_in.shape).astype(np.float32)


def _snap_q8_0(w: np.ndarray) -> np.ndarray:
    blocks = w.reshape(w.shape[0], -1, BLOCK)
    d = (np.abs(blocks).max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(blocks / np.where(d > 0, d, 1)), -127, 127)
    q[..., :1] = 127
    return (d * q).reshape(w.shape).astype(np.float32)


def _logits(bundle: Path, model_file: Path | None = None) -> np.ndarray:
    from npctalk.export.validate import OnnxDecoder

    manifest = load_manifest(bundle)
    decoder = OnnxDecoder(model_file or bundle / "model.onnx", manifest.io, manifest.num_layers)
    ids = np.array([[5, 17, 40, 3, 99, 120, 7, 64]])
    return decoder.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], decoder.empty_past(1))[0]


@pytest.mark.slow
def test_int4_export_of_a_gguf_like_model_stores_its_grid_exactly(grid_llama_dir: Path, tmp_path: Path) -> None:
    from npctalk.export.api import ExportOptions, export_bundle
    from npctalk.export.optimize import to_int4

    fp32 = export_bundle(grid_llama_dir, tmp_path / "fp32", ExportOptions(dtype="fp32"))
    int4 = export_bundle(grid_llama_dir, tmp_path / "int4", ExportOptions(dtype="int4"))
    report = json.loads((int4 / "validation.json").read_text())
    layers = load_manifest(int4).num_layers
    assert report["passed"]
    assert report["weights"] == {"exact_4bit": 4 * layers, "exact_8bit": 1, "exact_gather": 1,
                                 "quantized_4bit": 0, "quantized_8bit": 0, "float": 0}
    ops = [n.op_type for n in onnx.load(str(int4 / "model.onnx")).graph.node]
    assert "GatherBlockQuantized" in ops and "Gather" not in ops and "MatMul" in ops  # MatMul: the block offsets
    # The same graph re-quantized from float (integer zero points) lands off the source grid.
    requantized = tmp_path / "requantized"
    shutil.copytree(fp32, requantized)
    counts = to_int4(requantized / "model.onnx", exact_grid=False)
    assert counts["exact_4bit"] == 0 and counts["quantized_4bit"] > 0
    exact_fp32 = tmp_path / "exact-fp32-activations"
    shutil.copytree(fp32, exact_fp32)
    to_int4(exact_fp32 / "model.onnx", accuracy_level=0)
    reference = _logits(fp32)
    scale = np.abs(reference).max()
    exact_error = np.abs(_logits(int4) - reference).max() / scale
    requant_error = np.abs(_logits(requantized) - reference).max() / scale
    float_activation_error = np.abs(_logits(exact_fp32) - reference).max() / scale
    assert float_activation_error < 1e-4                # the source weights themselves: fp32 rounding only
    assert exact_error < requant_error / 2, (exact_error, requant_error)
