"""Small helpers to write an ONNX decoder graph by hand: a node/initializer builder and the parts
every lean decoder shares (inputs, the attention mask as an additive bias, the last-position head).

The I/O is the bundle contract (``npctalk.engine.bundle``) with one difference the runtime already
expects: ``logits`` holds the last position only, (batch, 1, vocab), float32.

Attention is ONNX Runtime's ``com.microsoft.GroupQueryAttention`` for both families (GPT-2 is the
case kv_heads == heads). What it does with our inputs, checked against a numpy reference and by the
parity tests:

- past/present are BNSH (batch, kv_heads, length, head_dim), present = past + the new positions,
  exactly the contract's cache.
- ``seqlens_k`` = total length - 1 for every row and ``total_sequence_length`` = past + seq: all
  rows have the same physical length, left padding included; causal masking is by physical slot.
- ``attention_bias`` (batch, 1, seq, past + seq) adds ``MASKED`` to every padded key, so a padded
  slot gets weight exp(MASKED - max) == 0.0 exactly in float32. A finite value (not -inf) keeps a
  padding query whose keys are all masked finite (uniform weights), so no NaN reaches the cache.
- Restriction of the operator (ONNX Runtime 1.31): a step with a past and seq > 1 needs batch 1
  (``batch_size must be 1 when sequence_length > 1 and past context``). The engine never does that:
  prefill and persona-prefix turns run one stream, batched decode feeds one token per row.

Rotary embeddings are a separate ``RotaryEmbedding`` node fed ``position_ids``, because
GroupQueryAttention's own rotary reads only the first position of a prompt (wrong for left padding).

Two input layouts (``LAYOUTS``):

- ``mask`` (above): ``attention_mask`` in, left padding for batches. ONNX Runtime's CUDA
  GroupQueryAttention refuses ``attention_bias``, so this layout runs on the CPU only.
- ``slots`` (CUDA bundles): no mask; ``seqlens_k`` (batch,) int32 (each row's total length - 1)
  and ``total_sequence_length`` () int32 (the longest row, or the KV buffer's capacity in a
  shared-buffer decode step) are inputs. Each row's keys start at position 0 and rows may differ
  in length (no padding), so a fixed set of KV "slots" can be decoded together in place with no
  shape that changes from step to step: what CUDA graph capture needs (``engine/slots.py``). The
  graph has no shape arithmetic at all, and also returns ``next_token`` (batch, 1, 1) int64, the
  argmax of the logits, so greedy decoding copies one integer per row back from the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

OPSET = 18
IR_VERSION = 10  # onnx 1.23 writes IR 14 by default; onnxruntime 1.31 reads up to 13
MS = "com.microsoft"
MASKED = -30000.0  # additive bias on padded keys; representable in float16
INT64_MAX = np.iinfo(np.int64).max

_ORT_ONLY_OPS = ("SimplifiedLayerNormalization",)  # in the default domain, but known to ONNX Runtime only
FLOAT_TYPES = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}
LAYOUTS = ("mask", "slots")


class GraphBuilder:
    """Collects nodes, initializers, inputs and outputs; ``model()`` returns the ModelProto.

    ``dtype`` (``fp32``/``fp16``) is the type of weights, activations and the KV cache; float
    arrays passed to ``weight`` are converted to it.
    """

    def __init__(self, name: str, dtype: str) -> None:
        if dtype not in FLOAT_TYPES:
            raise ValueError(f"The lean graph is built in fp32 or fp16, not {dtype!r}.")
        self.name, self.dtype = name, dtype
        self.np_float, self.onnx_float = FLOAT_TYPES[dtype]
        self.nodes: list[Any] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self.value_info: list[Any] = []
        self._names: set[str] = set()

    def weight(self, name: str, array: np.ndarray) -> str:
        """A float initializer in the graph's dtype; returns its name."""
        return self._initializer(name, np.ascontiguousarray(array, dtype=self.np_float))

    def const(self, name: str, array: np.ndarray | int | float | list[int]) -> str:
        """An initializer kept in its own (integer or float32) type, e.g. shapes and split sizes."""
        return self._initializer(name, np.asarray(array))

    def _initializer(self, name: str, array: np.ndarray) -> str:
        if name in self._names:
            raise ValueError(f"Two graph tensors are named {name!r}.")
        self._names.add(name)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1,
             domain: str = "", **attrs: Any) -> list[str]:
        """Add one node called ``name``; outputs are ``{name}/output_{i}`` unless named. Returns them.

        An output named ``""`` is an optional output left out. Outputs of contrib ops are declared
        as the graph's float type: onnx's shape inference does not know those ops, and the
        quantizers need every tensor's type.
        """
        names = outputs if isinstance(outputs, list) else [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=name, domain=domain or None, **attrs))
        if domain == MS or op in _ORT_ONLY_OPS:
            self.value_info += [helper.make_tensor_value_info(n, self.onnx_float, None) for n in names if n]
        return names

    def one(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs: Any) -> str:
        """``node`` with a single output; returns its name."""
        return self.node(op, inputs, name, 1, domain, **attrs)[0]

    def add_input(self, name: str, elem: int, shape: list[str | int]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def add_output(self, name: str, elem: int, shape: list[str | int]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def model(self, producer: str) -> ModelProto:
        declared = {v.name for v in self.outputs}
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers,
                                  value_info=[v for v in self.value_info if v.name not in declared])
        model = helper.make_model(graph, ir_version=IR_VERSION, producer_name=producer,
                                  opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)])
        return model


@dataclass(frozen=True)
class DecoderInputs:
    """Names of the graph inputs and of the values every layer's attention shares."""

    input_ids: str         # (batch, seq) int64
    position_ids: str      # (batch, seq) int64
    seqlens_k: str         # (batch,) int32, total length - 1
    total_length: str      # () int32, past + seq
    attention_bias: str | None  # (batch, 1, seq, past + seq) float, MASKED on padded keys; None in the slots layout


def decoder_inputs(b: GraphBuilder, io: dict[str, Any], num_layers: int, kv_heads: int, head_dim: int,
                   layout: str = "mask") -> DecoderInputs:
    """Declare the contract's inputs; in the ``mask`` layout, build the attention bias and lengths from
    ``attention_mask``; in the ``slots`` layout the lengths are inputs themselves."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    ids = b.add_input(io["input_ids"], TensorProto.INT64, ["batch_size", "sequence_length"])
    mask = "" if layout == "slots" else b.add_input(io["attention_mask"], TensorProto.INT64,
                                                     ["batch_size", "total_sequence_length"])
    positions = b.add_input(io["position_ids"], TensorProto.INT64, ["batch_size", "sequence_length"])
    if layout == "slots":
        seqlens_k = b.add_input(io["seqlens_k"], TensorProto.INT32, ["batch_size"])
        total = b.add_input(io["total_sequence_length"], TensorProto.INT32, [])
    for layer in range(num_layers):
        for kind in ("key", "value"):
            b.add_input(io[f"past_{kind}"].format(layer=layer), b.onnx_float,
                        ["batch_size", kv_heads, "past_sequence_length", head_dim])
    if layout == "slots":
        return DecoderInputs(ids, positions, seqlens_k, total, None)
    # Lengths: all rows share the physical length past + seq (left padding is masked, not skipped).
    batch = b.one("Shape", [mask], "/attn_mask/batch", start=0, end=1)                  # (1,) int64
    total = b.one("Shape", [mask], "/attn_mask/total", start=1, end=2)                  # (1,) int64
    seq = b.one("Shape", [ids], "/attn_mask/seq", start=1, end=2)                       # (1,) int64
    total32 = b.one("Cast", [total], "/attn_mask/total_int32", to=TensorProto.INT32)
    last = b.one("Sub", [total32, b.const("/attn_mask/one_int32", np.array([1], np.int32))], "/attn_mask/last")
    seqlens = b.one("Expand", [last, batch], "/attn_mask/seqlens_k")                    # (batch,) int32
    total_scalar = b.one("Squeeze", [total32, b.const("/attn_mask/axis0", np.array([0], np.int64))],
                         "/attn_mask/total_scalar")                                      # () int32
    # Bias: 0 on real keys, MASKED on padding, broadcast to (batch, 1, seq, total).
    maskf = b.one("Cast", [mask], "/attn_mask/float", to=b.onnx_float)
    masked = b.one("Sub", [maskf, b.weight("/attn_mask/one", np.array(1.0))], "/attn_mask/minus_one")
    scaled = b.one("Mul", [masked, b.weight("/attn_mask/masked_value", np.array(-MASKED))], "/attn_mask/scaled")
    bias4 = b.one("Unsqueeze", [scaled, b.const("/attn_mask/axes12", np.array([1, 2], np.int64))], "/attn_mask/unsqueeze")
    shape = b.one("Concat", [batch, b.const("/attn_mask/one_int64", np.array([1], np.int64)), seq, total],
                  "/attn_mask/bias_shape", axis=0)
    bias = b.one("Expand", [bias4, shape], "/attn_mask/bias")
    return DecoderInputs(ids, positions, seqlens, total_scalar, bias)


def attention(b: GraphBuilder, prefix: str, layer: int, io: dict[str, Any], inputs: DecoderInputs,
              qkv: list[str], heads: int, kv_heads: int, scale: float | None = None,
              rotary: tuple[str, str] | None = None) -> str:
    """GroupQueryAttention over ``qkv`` (one packed tensor, or q, k, v); writes present.{layer}.*.

    ``rotary``: (cos_cache, sin_cache) names, (positions, head_dim / 2) each: the kernel rotates q
    and k (half-split, as transformers' Llama) at positions it derives from ``seqlens_k``: 0.. for
    a first prompt, the row's length before the new tokens otherwise. Exact only where every row's
    keys start at position 0 (the slots layout), not under left padding.

    Returns the attention output (batch, seq, heads * head_dim).
    """
    past = [io["past_key"].format(layer=layer), io["past_value"].format(layer=layer)]
    present = [io["present_key"].format(layer=layer), io["present_value"].format(layer=layer)]
    q_k_v = qkv if len(qkv) == 3 else [qkv[0], "", ""]
    attrs: dict[str, Any] = {"num_heads": heads, "kv_num_heads": kv_heads}
    if scale is not None:
        attrs["scale"] = float(scale)
    out = f"{prefix}/attn/GroupQueryAttention/output_0"
    extra: list[str] = []  # optional inputs after total_sequence_length: cos, sin, position_ids, attention_bias
    if rotary is not None:
        if inputs.attention_bias:
            raise ValueError("The kernel's own rotary is exact only without padding (the slots layout).")
        attrs.update(do_rotary=1, rotary_interleaved=0)
        extra = list(rotary)
    elif inputs.attention_bias:
        extra = ["", "", "", inputs.attention_bias]
    b.node("GroupQueryAttention", [*q_k_v, *past, inputs.seqlens_k, inputs.total_length, *extra],
           f"{prefix}/attn/GroupQueryAttention", [out, *present], MS, **attrs)
    return out


def declare_outputs(b: GraphBuilder, io: dict[str, Any], num_layers: int, kv_heads: int, head_dim: int,
                    vocab: int, layout: str = "mask") -> None:
    """logits (batch, 1, vocab) float32 and present.{i}.key/value (batch, kv_heads, total, head_dim);
    in the slots layout also next_token (batch, 1, 1) int64, the logits' argmax."""
    b.add_output(io["logits"], TensorProto.FLOAT, ["batch_size", 1, vocab])
    if layout == "slots":
        b.node("ArgMax", [io["logits"]], "/next_token/ArgMax", [io["next_token"]], axis=-1, keepdims=1)
        b.add_output(io["next_token"], TensorProto.INT64, ["batch_size", 1, 1])
    for layer in range(num_layers):
        for kind in ("key", "value"):
            b.add_output(io[f"present_{kind}"].format(layer=layer), b.onnx_float,
                         ["batch_size", kv_heads, "total_sequence_length", head_dim])


def last_position(b: GraphBuilder, hidden: str) -> str:
    """(batch, seq, hidden) → (batch, 1, hidden): the runtime samples from the last position only."""
    return b.one("Slice", [hidden, b.const("/last/start", np.array([-1], np.int64)),
                           b.const("/last/end", np.array([INT64_MAX], np.int64)),
                           b.const("/last/axis", np.array([1], np.int64))], "/last/Slice")


def lm_head(b: GraphBuilder, hidden: str, io: dict[str, Any], embedding: str | None, weight: np.ndarray | None,
            bias: np.ndarray | None = None) -> None:
    """Project (batch, 1, hidden) to ``logits`` (batch, 1, vocab) float32.

    ``embedding``: the name of the tied (vocab, hidden) token embedding, reused through
    Gemm(transB=1) so the file holds it once. Otherwise ``weight`` (hidden, vocab) becomes its own
    MatMul, the form the int8/int4 quantizers handle (they need a constant (K, N) right operand).
    """
    out = io["logits"]
    cast = b.dtype != "fp32"
    steps: list[tuple[str, list[str], str, dict[str, Any]]] = []  # (op, inputs, name, attrs); the last writes ``out``
    if embedding is not None:
        flat = b.one("Squeeze", [hidden, b.const("/lm_head/axis1", np.array([1], np.int64))], "/lm_head/Squeeze")
        gemm_in = [flat, embedding] + ([b.weight("lm_head.bias", bias)] if bias is not None else [])
        steps += [("Gemm", gemm_in, "/lm_head/Gemm", {"transB": 1}),                   # (batch, vocab)
                  ("Unsqueeze", ["/lm_head/axis1"], "/lm_head/Unsqueeze", {})]        # (batch, 1, vocab)
    else:
        assert weight is not None
        steps.append(("MatMul", [hidden, b.weight("lm_head.weight", weight)], "/lm_head/MatMul", {}))
        if bias is not None:
            steps.append(("Add", [b.weight("lm_head.bias", bias)], "/lm_head/Add", {}))
    if cast:
        steps.append(("Cast", [], "/lm_head/Cast", {"to": TensorProto.FLOAT}))
    previous: list[str] = []
    for i, (op, inputs, name, attrs) in enumerate(steps):
        inputs = inputs if not previous else [previous[0], *inputs]
        previous = b.node(op, inputs, name, [out] if i == len(steps) - 1 else 1, **attrs)


def numpy(tensor: Any) -> np.ndarray:
    """A torch parameter as a float32 numpy array (detached, on the CPU)."""
    return tensor.detach().to("cpu").float().numpy()
