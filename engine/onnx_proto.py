"""Small ONNX graphs written as protobuf bytes, without the ``onnx`` package.

The engine runs a few helper graphs of its own beside the model: TopK over the logits
(``topk.py``) and the copies of a KV slot's prefix in and out (``slot_copy.py``); ``session`` runs one. ``onnx`` is a
build-time package (the ``export`` extra), not something a game installs, so these graphs are
serialized here: the handful of ``ModelProto`` fields they use, in protobuf's wire format.

Field numbers are those of ``onnx/onnx.proto`` (proto2: repeated numbers are written unpacked, as
``onnx`` itself writes them). The tests parse what this writes with ``onnx`` and compare it with
``onnx.helper``'s model of the same graph, and run it in ONNX Runtime.

    graph = model([node("TopK", ["logits", "k"], ["values", "ids"], axis=-1)],
                  [tensor_info("logits", FLOAT, None)], [tensor_info("values", FLOAT, None), ...],
                  [int64_tensor("k", [1], [40])])
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

import onnxruntime as ort

# TensorProto.DataType
FLOAT, INT32, INT64, FLOAT16 = 1, 6, 7, 10
ELEMENT_TYPES = {"float32": FLOAT, "int32": INT32, "int64": INT64, "float16": FLOAT16}  # numpy dtype name → ONNX
IR_VERSION = 10  # what ONNX Runtime 1.31 loads
_ATTR_FLOAT, _ATTR_INT, _ATTR_STRING, _ATTR_INTS = 1, 2, 3, 7  # AttributeProto.AttributeType

Attribute = int | float | str | Sequence[int]


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # a negative int64 is its 64-bit two's complement (ten bytes)
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def _attribute(name: str, value: Attribute) -> bytes:
    """AttributeProto: name 1, f 2, i 3, s 4, ints 8, type 20."""
    if isinstance(value, bool) or isinstance(value, int):
        return _bytes(1, name) + _int(3, int(value)) + _int(20, _ATTR_INT)
    if isinstance(value, float):
        return _bytes(1, name) + _float(2, value) + _int(20, _ATTR_FLOAT)
    if isinstance(value, str):
        return _bytes(1, name) + _bytes(4, value) + _int(20, _ATTR_STRING)
    return _bytes(1, name) + b"".join(_int(8, int(v)) for v in value) + _int(20, _ATTR_INTS)


def node(op_type: str, inputs: Sequence[str], outputs: Sequence[str], *, domain: str = "",
         **attributes: Attribute) -> bytes:
    """NodeProto: input 1, output 2, op_type 4, attribute 5 (sorted by name), domain 7."""
    out = b"".join(_bytes(1, name) for name in inputs) + b"".join(_bytes(2, name) for name in outputs)
    out += _bytes(4, op_type)
    out += b"".join(_bytes(5, _attribute(key, attributes[key])) for key in sorted(attributes))
    return out + (_bytes(7, domain) if domain else b"")


def tensor_info(name: str, element_type: int, shape: Sequence[int | str | None] | None) -> bytes:
    """ValueInfoProto of a tensor: ``shape`` None leaves the rank open; a dimension is a size, a
    symbolic name, or None (unknown)."""
    tensor = _int(1, element_type)  # TypeProto.Tensor: elem_type 1, shape 2
    if shape is not None:
        dims = []
        for dim in shape:  # TensorShapeProto.Dimension: dim_value 1, dim_param 2
            dims.append(b"" if dim is None else _int(1, dim) if isinstance(dim, int) else _bytes(2, dim))
        tensor += _bytes(2, b"".join(_bytes(1, dim) for dim in dims))
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor))  # ValueInfoProto: name 1, type 2 (TypeProto: tensor_type 1)


def int64_tensor(name: str, dims: Sequence[int], values: Sequence[int]) -> bytes:
    """TensorProto of int64 values: dims 1, data_type 2, int64_data 7, name 8."""
    out = b"".join(_int(1, d) for d in dims) + _int(2, INT64)
    return out + b"".join(_int(7, int(v)) for v in values) + _bytes(8, name)


def model(nodes: Sequence[bytes], inputs: Sequence[bytes], outputs: Sequence[bytes],
          initializers: Sequence[bytes] = (), *, opset: int = 17, name: str = "npctalk") -> bytes:
    """ModelProto bytes of one graph in the default domain at ``opset``. Field numbers: ModelProto
    ir_version 1, graph 7, opset_import 8; GraphProto node 1, name 2, initializer 5, input 11, output 12."""
    graph = b"".join(_bytes(1, n) for n in nodes) + _bytes(2, name)
    graph += b"".join(_bytes(5, t) for t in initializers)
    graph += b"".join(_bytes(11, i) for i in inputs) + b"".join(_bytes(12, o) for o in outputs)
    opset_id = _bytes(1, "") + _int(2, opset)  # OperatorSetIdProto: domain 1, version 2
    return _int(1, IR_VERSION) + _bytes(7, graph) + _bytes(8, opset_id)


def session(graph: bytes, device: str, *, threads: int = 1,
            cuda_options: Mapping[str, str] | None = None) -> ort.InferenceSession:
    """A quiet ONNX Runtime session for one helper graph on ``device`` (``cpu`` or ``cuda``, with the
    CPU provider behind it), ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    cpu = "CPUExecutionProvider"
    providers = [("CUDAExecutionProvider", dict(cuda_options or {})), cpu] if device == "cuda" else [cpu]
    return ort.InferenceSession(graph, options, providers=providers)
