"""Weights that already lie on a block-quantization grid go into ``MatMulNBits`` unchanged.

The default model comes from a GGUF file whose linear layers are Q4_1 (blocks of 32 input
channels, ``w = d * q + m`` with q in 0..15 and an fp16 scale d and minimum m per block) and whose
embedding / tied LM head is Q8_0 (``w = d * q``, q in -127..127). Loading it de-quantizes to
float32, so the fp32 bundle holds exactly those grid values. Re-quantizing them with
``MatMulNBitsQuantizer`` (integer zero points) cannot land on the same grid and costs perplexity;
``MatMulNBits`` with float zero points would, but ONNX Runtime 1.31 runs that through a slow
de-quantizing path (about 60x slower per call on this CPU). So:

- A Q4_1 weight becomes a symmetric 4-bit ``MatMulNBits`` (q, scale d, the default zero point 8)
  plus a small correction for the block offsets: ``x @ W = MatMulNBits(x) + blocksum(x) @ C`` with
  ``C[b, n] = m[n, b] + 8 * d[n, b]`` and ``blocksum(x)[b]`` the sum of x over block b's 32 input
  channels (a Reshape, a ReduceSum and a (K/32, N) MatMul, shared by MatMuls reading the same x).
- A Q8_0 weight becomes an 8-bit ``MatMulNBits`` (q + 128, scale d, default zero point 128): exact
  with no correction. A Q8_0 embedding table read by a ``Gather`` becomes ``GatherBlockQuantized``
  (the same 8-bit form): a quarter of the float table's memory.

The grid is recovered from the float32 values alone (block min/max give m and d, then q), and a
weight is only taken when every block reconstructs to within float32 rounding, so fused weights
(q|k|v, gate|up), permuted rows and both graph builders work, and a weight that is not on a grid
is left for the ordinary quantizer. With ``accuracy_level`` 4 the CPU kernel still quantizes the
activations to int8 per block, as llama.cpp does for the same Q4_1 weights.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

BLOCK = 32
# A block is on the grid when every value reconstructs to within this many float32 ulps of the
# block's largest magnitude (de-quantization rounds once; recovering d rounds a few times more).
ULPS = 8
_EPS = float(np.finfo(np.float32).eps)
OFFSETS_SUFFIX = "/Offsets"  # the correction MatMuls; the ordinary quantizer must leave them float


@dataclass(frozen=True)
class GridWeight:
    """One (K, N) MatMul weight as MatMulNBits tensors: ``packed`` (N, K/32, 32*bits/8) uint8,
    ``scales`` (N*K/32,) float32, and for 4 bits ``correction`` (K/32, N) float32."""

    bits: int
    packed: np.ndarray
    scales: np.ndarray
    correction: np.ndarray | None


def _blocks(weight_kn: np.ndarray) -> np.ndarray | None:
    """(K, N) → (N, K/32, 32) float64 blocks along the input channels, or None if K is not a multiple."""
    k, n = weight_kn.shape
    if k % BLOCK:
        return None
    return weight_kn.T.astype(np.float64).reshape(n, k // BLOCK, BLOCK)


def _on_grid(blocks: np.ndarray, rebuilt: np.ndarray) -> bool:
    limit = ULPS * _EPS * np.abs(blocks).max(axis=-1, keepdims=True) + 1e-30
    return bool(np.all(np.abs(rebuilt - blocks) <= limit))


def recover_q4_1(weight_kn: np.ndarray) -> GridWeight | None:
    """The 4-bit affine grid (Q4_1: q = 0 at the block minimum, 15 at its maximum), or None."""
    blocks = _blocks(weight_kn)
    if blocks is None:
        return None
    low, high = blocks.min(axis=-1), blocks.max(axis=-1)
    scale = ((high - low) / 15.0).astype(np.float32).astype(np.float64)
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    q = np.clip(np.rint((blocks - low[..., None]) / safe), 0, 15)
    q = np.where(scale[..., None] > 0, q, 0)
    if not _on_grid(blocks, scale[..., None] * q + low[..., None]):
        return None
    q8 = q.astype(np.uint8)
    packed = (q8[..., 0::2] | (q8[..., 1::2] << 4)).astype(np.uint8)       # low nibble: even channel
    correction = (low + 8.0 * scale).T.astype(np.float32)                  # (K/32, N)
    return GridWeight(4, np.ascontiguousarray(packed), scale.astype(np.float32).reshape(-1),
                      np.ascontiguousarray(correction))


def recover_q8_0(weight_kn: np.ndarray) -> GridWeight | None:
    """The 8-bit symmetric grid (Q8_0: the block's largest magnitude at ±127), or None."""
    blocks = _blocks(weight_kn)
    if blocks is None:
        return None
    scale = (np.abs(blocks).max(axis=-1) / 127.0).astype(np.float32).astype(np.float64)
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    q = np.clip(np.rint(blocks / safe), -127, 127)
    if not _on_grid(blocks, scale[..., None] * q):
        return None
    return GridWeight(8, np.ascontiguousarray((q + 128).astype(np.uint8)), scale.astype(np.float32).reshape(-1), None)


def _probed(recover_grid: Callable[[np.ndarray], GridWeight | None], weight_kn: np.ndarray) -> GridWeight | None:
    """``recover_grid`` on a few output channels first (an ordinary float weight fails there, cheaply),
    then on the whole weight."""
    return recover_grid(weight_kn) if recover_grid(weight_kn[:, :8]) is not None else None


def recover(weight_kn: np.ndarray) -> GridWeight | None:
    """The weight's grid (Q4_1 tried first, then Q8_0), or None when it is on neither."""
    if weight_kn.ndim != 2 or weight_kn.dtype != np.float32:
        return None
    return _probed(recover_q4_1, weight_kn) or _probed(recover_q8_0, weight_kn)


def import_grid_weights(model: onnx.ModelProto, accuracy_level: int) -> dict[str, int]:
    """Replace every MatMul whose constant weight is on a grid with its exact MatMulNBits form, in place.

    Embedding ``Gather``s of a Q8_0-grid table become 8-bit ``GatherBlockQuantized``. Returns counts:
    ``exact_4bit`` and ``exact_8bit`` MatMuls and ``exact_gather`` Gathers rewritten; the rest is untouched.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers = Counter(name for node in model.graph.node for name in node.input)
    counts = {"exact_4bit": 0, "exact_8bit": 0, "exact_gather": 0}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    block_sums: dict[str, str] = {}
    dropped: set[str] = set()

    def const(name: str, array: np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(array, name))
        return name

    for node in model.graph.node:
        if node.op_type == "Gather" and (gathered := _gather_q8_0(node, inits, const)) is not None:
            if consumers[node.input[0]] == 1:
                dropped.add(node.input[0])
            new_nodes.append(gathered)
            counts["exact_gather"] += 1
            continue
        weight_init = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        grid = recover(numpy_helper.to_array(weight_init)) if weight_init is not None else None
        if grid is None:
            new_nodes.append(node)
            continue
        x, (k, n) = node.input[0], weight_init.dims
        base = node.name or node.output[0]
        attrs = {"K": k, "N": n, "bits": grid.bits, "block_size": BLOCK, "accuracy_level": accuracy_level}
        weights = [const(f"{weight_init.name}.q{grid.bits}", grid.packed), const(f"{weight_init.name}.scales", grid.scales)]
        if consumers[weight_init.name] == 1:
            dropped.add(weight_init.name)
        if grid.correction is None:
            new_nodes.append(helper.make_node("MatMulNBits", [x, *weights], list(node.output), f"{base}_Q8",
                                              domain="com.microsoft", **attrs))
            counts["exact_8bit"] += 1
            continue
        main = f"{base}_Q4/output_0"
        new_nodes.append(helper.make_node("MatMulNBits", [x, *weights], [main], f"{base}_Q4",
                                          domain="com.microsoft", **attrs))
        key = f"{x}|{k}"
        if key not in block_sums:
            shape = const(f"{base}/block_shape", np.array([0, 0, k // BLOCK, BLOCK], np.int64))
            axes = const(f"{base}/block_axes", np.array([-1], np.int64))
            new_nodes.append(helper.make_node("Reshape", [x, shape], [f"{base}/blocks"], f"{base}/BlockReshape"))
            new_nodes.append(helper.make_node("ReduceSum", [f"{base}/blocks", axes], [f"{base}/block_sums"],
                                              f"{base}/BlockSum", keepdims=0))
            block_sums[key] = f"{base}/block_sums"
        offsets = const(f"{weight_init.name}.block_offsets", grid.correction)
        new_nodes.append(helper.make_node("MatMul", [block_sums[key], offsets], [f"{base}/offsets"], f"{base}{OFFSETS_SUFFIX}"))
        new_nodes.append(helper.make_node("Add", [main, f"{base}/offsets"], list(node.output), f"{base}/AddOffsets"))
        counts["exact_4bit"] += 1

    if any(counts.values()):
        kept = [i for i in model.graph.initializer if i.name not in dropped]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept + new_inits)
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        if not any(op.domain == "com.microsoft" for op in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return counts


def _gather_q8_0(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], const: Callable[[str, np.ndarray], str]
                 ) -> onnx.NodeProto | None:
    """An embedding ``Gather`` (axis 0) of a Q8_0-grid table as ``GatherBlockQuantized`` (8 bits,
    blocks of 32 along the hidden size, default zero point 128), or None."""
    from onnx import helper, numpy_helper

    table = inits.get(node.input[0])
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
    if table is None or axis != 0 or len(table.dims) != 2:
        return None
    array = numpy_helper.to_array(table)
    grid = _probed(recover_q8_0, array.T) if array.dtype == np.float32 else None
    if grid is None:
        return None
    rows, width = table.dims
    data = const(f"{table.name}.q8", grid.packed.reshape(rows, width))
    scales = const(f"{table.name}.scales", grid.scales.reshape(rows, width // BLOCK))
    return helper.make_node("GatherBlockQuantized", [data, node.input[1], scales], list(node.output),
                            f"{node.name or node.output[0]}_Q8", domain="com.microsoft", bits=8, block_size=BLOCK,
                            gather_axis=0, quantize_axis=1)
