"""The engine's own ONNX writer: what it writes is what ``onnx.helper`` makes, and ONNX Runtime runs it."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from npctalk.engine import onnx_proto as proto
from npctalk.engine import topk


def _helper_model(nodes: list, inputs: list, outputs: list, initializers: list, opset: int, name: str) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = proto.IR_VERSION
    return model


def test_every_field_kind_parses_as_onnx_helper_writes_it() -> None:
    ours = proto.model(
        [proto.node("TopK", ["x", "k"], ["v", "i"], axis=-1, largest=1, sorted=0),
         proto.node("Pad", ["v", "pads"], ["p"], mode="constant"),
         proto.node("LeakyRelu", ["p"], ["y"], alpha=0.25),
         proto.node("Transpose", ["y"], ["t"], perm=[1, 0, -2 + 2]),
         proto.node("Custom", ["t"], ["z"], domain="com.example")],
        [proto.tensor_info("x", proto.FLOAT, ["batch", None, 7]), proto.tensor_info("pads", proto.INT64, None)],
        [proto.tensor_info("z", proto.FLOAT16, []), proto.tensor_info("i", proto.INT64, [3])],
        [proto.int64_tensor("k", [1], [40]), proto.int64_tensor("big", [2, 2], [-1, 2**40, 0, -(2**63)])],
        opset=18, name="g")
    theirs = _helper_model(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, largest=1, sorted=0),
         helper.make_node("Pad", ["v", "pads"], ["p"], mode="constant"),
         helper.make_node("LeakyRelu", ["p"], ["y"], alpha=0.25),
         helper.make_node("Transpose", ["y"], ["t"], perm=[1, 0, 0]),
         helper.make_node("Custom", ["t"], ["z"], domain="com.example")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", None, 7]),
         helper.make_tensor_value_info("pads", TensorProto.INT64, None)],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT16, []),
         helper.make_tensor_value_info("i", TensorProto.INT64, [3])],
        [helper.make_tensor("k", TensorProto.INT64, [1], [40]),
         helper.make_tensor("big", TensorProto.INT64, [2, 2], [-1, 2**40, 0, -(2**63)])],
        18, "g")
    assert onnx.load_from_string(ours) == theirs


def test_a_changed_field_is_seen_by_the_comparison() -> None:
    """The comparison above can fail: one differing attribute makes the models differ."""
    ours = proto.model([proto.node("TopK", ["x", "k"], ["v", "i"], axis=-1)], [], [])
    theirs = _helper_model([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1)], [], [], [], 17, "npctalk")
    assert onnx.load_from_string(ours) != theirs


def test_the_topk_graphs_run_in_onnx_runtime() -> None:
    logits = np.random.default_rng(0).standard_normal((3, 1, 50)).astype(np.float32)
    session = ort.InferenceSession(topk.graphs(5)["bonused_topk"], providers=["CPUExecutionProvider"])
    bonus_ids = np.array([[7], [0], [49]], dtype=np.int64)
    bonus_values = np.array([[100.0], [0.0], [-100.0]], dtype=np.float32)
    values, ids = session.run(None, {"logits": logits, "bonus_ids": bonus_ids, "bonus_values": bonus_values})
    flat = logits.reshape(3, 50).copy()
    np.add.at(flat, (np.arange(3)[:, None], bonus_ids), bonus_values)
    for row in range(3):
        assert set(ids[row].tolist()) == set(np.argsort(-flat[row])[:5].tolist())
        np.testing.assert_allclose(np.sort(values[row]), np.sort(flat[row])[-5:])
    assert 7 in ids[0].tolist() and 49 not in ids[2].tolist()


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**35, -1, -(2**63)])
def test_varints_round_trip_through_protobuf(value: int) -> None:
    parsed = TensorProto()
    parsed.ParseFromString(proto.int64_tensor("t", [1], [value]))
    assert list(parsed.int64_data) == [value] and parsed.name == "t" and parsed.data_type == TensorProto.INT64
