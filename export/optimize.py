"""Step 2 of export: make the requested precision from the fp32 graph, in place.

- ``fp32``: the graph as exported.
- ``fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16`` on the fp32 graph. Weights,
  activations and the KV cache (past/present) become float16; ``logits`` stays float32 (a Cast at
  the end) so sampling never sees fp16 rounding. optimum's own fp16 export is avoided on purpose:
  for GPT-2 it yields LayerNormalization nodes bound to float and float16 at once, which
  onnxruntime-gpu rejects. The result runs on CUDA, and also on the CPU (slower than fp32 there:
  ORT casts around most fp16 CPU kernels), so it can be validated on a CPU-only machine.
- ``int8``: ``onnxruntime.quantization.quantize_dynamic`` (weights int8 per output channel,
  activations uint8 scaled per call) of every weight MatMul/Gather except the MLP down
  projections: for the CPU execution provider. KV cache and logits stay float32. GPT-2's Gemm
  layers are first rewritten as MatMul + Add, which the quantizer handles and Gemm it does not.
- ``int4``: weights that are already 4-/8-bit block-quantized (a GGUF source such as the default
  model: Q4_1 linear layers, Q8_0 embedding) are stored exactly as they are (``block_grid.py``):
  SmolLM2-135M perplexity +0.6% vs fp32 (the CPU kernel's int8 activations; 0.0% at accuracy level
  0), 146 MB, against +11.1% and 230 MB when the same weights are re-quantized as below
  (bench/results/quality-smollm2-135m-instruct-lean-*). Any
  other weight gets weight-only quantization to ``MatMulNBits`` (onnxruntime's ``matmul_nbits_quantizer``,
  round-to-nearest per block of ``INT4_BLOCK_SIZE`` input channels, one scale and uint4 zero point
  each): 4 bits for every weight MatMul except the LM head and the MLP down projections, which get
  8 bits (``INT4_SENSITIVE_NODES``). A tied LM head reads the embedding through a Transpose; it gets
  its own transposed copy so it can be quantized (the embedding Gather stays fp32). Activations,
  KV cache and logits stay float. Chosen by perplexity on ``data/heldout`` (``bench/quality.py
  --sweep``, SmolLM2-135M-Instruct, bench/results/quality-*): all 4-bit +30.5% vs fp32; 8-bit head
  and down projections +11.2% (229 MB), as good as keeping them fp32 (+11.0%, 385 MB); block 16
  (-1.3 points) and symmetric blocks (+0.2) barely matter. HQQ (float zero points) scored about
  +8% in a development run but leaves MatMulNBits' fast CPU path, so it was not kept.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from npctalk.engine.errors import ExportError

from .block_grid import OFFSETS_SUFFIX, import_grid_weights
from .progress import heartbeat

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

# ONNX protobufs cannot exceed 2 GiB; above this size weights go to one external data file.
EXTERNAL_DATA_BYTES = 1_800_000_000
SCRATCH = "optimize-scratch"
KEEP_FLOAT32 = ["logits"]
# int8: the MLP down projection's input (after the gated activation) carries the model's outlier
# activations; one per-tensor uint8 scale for it wrecks every other token. Keeping these MatMuls in
# fp32 cut SmolLM2-135M's worst prefill logit error from 18.8 to 5.1 (bundle +80 MB).
KEEP_FP32_NODES = re.compile(r"/mlp/(down_proj|c_proj)/")
# int4, chosen by perplexity of SmolLM2-135M-Instruct on data/heldout (bench/results/quality-*):
INT4_BLOCK_SIZE = 32        # input channels per scale (16: 1.3 points better, +10% size)
INT4_SYMMETRIC = False      # asymmetric: one uint4 zero point per block
INT4_ACCURACY_LEVEL = 4     # CPU kernel: activations quantized to int8 per block for the dot products
# The LM head and the MLP down projections carry most of the 4-bit loss; they get 8-bit weights.
INT4_SENSITIVE_NODES: re.Pattern[str] | None = re.compile(r"/mlp/(down_proj|c_proj)/|^/lm_head/")
INT4_SENSITIVE_BITS: int | None = 8


def data_files(model_path: Path) -> list[Path]:
    """External-data files next to ``model_path`` (``model.onnx.data``, or optimum's ``model.onnx_data``)."""
    return [p for p in (model_path.with_name(model_path.name + "_data"), model_path.with_name(model_path.name + ".data"))
            if p.exists()]


def _size(model_path: Path) -> int:
    return model_path.stat().st_size + sum(p.stat().st_size for p in data_files(model_path))


def _scratch(model_path: Path) -> Path:
    """Folder where a converted graph is written under its final names (external data keeps its location)."""
    scratch = model_path.parent / f".{SCRATCH}"
    scratch.mkdir(exist_ok=True)
    return scratch / model_path.name


def _install(new_path: Path, model_path: Path) -> None:
    """Replace ``model_path`` and its external data by ``new_path`` and its own."""
    for old in data_files(model_path):
        old.unlink()
    for data in data_files(new_path):
        data.rename(model_path.parent / data.name)
    new_path.replace(model_path)


def save(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """Save ``model`` at ``path``; with ``external``, all weights go to ``<path name>.data`` beside it."""
    import onnx

    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save(model, str(path))


def to_fp16(model_path: Path) -> None:
    """Convert ``model_path`` to float16 in place (inputs/outputs float16 except ``logits``)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    size = _size(model_path)
    model = onnx.load(str(model_path))
    model = convert_float_to_float16(model, keep_io_types=KEEP_FLOAT32, disable_shape_infer=size > EXTERNAL_DATA_BYTES)
    new_path = _scratch(model_path)
    save(model, new_path, external=size // 2 > EXTERNAL_DATA_BYTES)
    _install(new_path, model_path)


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite ``Gemm(A, W, b)`` with a constant ``W`` as ``MatMul(A, W) + b``, in place; return the count.

    GPT-2's linear layers (``Conv1D``) export as Gemm, which ``quantize_dynamic`` does not handle:
    without this, an "int8" GPT-2 would quantize its embeddings and nothing else.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    readers = Counter(name for node in model.graph.node for name in node.input)
    nodes, count = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight, weight_name = inits[node.input[1]], node.input[1]
        if attrs.get("transB", 0):
            transposed = numpy_helper.to_array(weight).T.copy()
            if readers[weight_name] > 1:  # a tied LM head: the embedding's Gather still reads it as it is
                weight_name = f"{weight_name}.untied_T"
                model.graph.initializer.append(numpy_helper.from_array(transposed, weight_name))
            else:
                weight.CopyFrom(numpy_helper.from_array(transposed, weight_name))
        base = node.name.removesuffix("/Gemm") if node.name.endswith("/Gemm") else node.name
        inputs = [node.input[0], weight_name]
        if len(node.input) > 2 and node.input[2]:
            product = f"{base}/MatMul_output_0"
            nodes.append(helper.make_node("MatMul", inputs, [product], name=f"{base}/MatMul"))
            nodes.append(helper.make_node("Add", [product, node.input[2]], list(node.output), name=f"{base}/Add"))
        else:
            nodes.append(helper.make_node("MatMul", inputs, list(node.output), name=f"{base}/MatMul"))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


def to_int8(model_path: Path) -> None:
    """Quantize ``model_path``'s weights to int8 in place (dynamic quantization for the CPU provider)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = _size(model_path) // 4 > EXTERNAL_DATA_BYTES
    model = onnx.load(str(model_path))
    rewritten = gemm_to_matmul(model)
    if rewritten:
        log.info("Rewrote %d Gemm nodes as MatMul + Add so they can be quantized", rewritten)
    excluded = [n.name for n in model.graph.node if n.op_type == "MatMul" and KEEP_FP32_NODES.search(n.name)]
    new_path = _scratch(model_path)
    quantize_dynamic(
        model, new_path, weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=excluded,
        use_external_data_format=external, extra_options={"MatMulConstBOnly": True},
    )
    _install(new_path, model_path)


def untie_lm_head(model: onnx.ModelProto) -> int:
    """Give every MatMul that reads a constant weight through a Transpose its own transposed weight.

    A tied LM head exports as ``MatMul(h, Transpose(embedding))``; the weight-only quantizer only
    handles constant weights. Returns the number of MatMuls rewritten; the embedding stays for its Gather.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    transposes = {n.output[0]: n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits}
    count = 0
    for node in model.graph.node:
        source = transposes.get(node.input[1]) if node.op_type == "MatMul" else None
        if source is None:
            continue
        perm = next((list(helper.get_attribute_value(a)) for a in source.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(inits[source.input[0]])
        if weight.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = f"{source.input[0]}.untied_T"
        model.graph.initializer.append(numpy_helper.from_array(weight.T.copy(), name))
        node.input[1] = name
        count += 1
    used = {i for n in model.graph.node for i in n.input}
    kept = [n for n in model.graph.node if not (n.op_type == "Transpose" and n.output[0] not in used)]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return count


def to_int4(model_path: Path, *, block_size: int | None = None, symmetric: bool | None = None,
            accuracy_level: int | None = None, sensitive: re.Pattern[str] | None = INT4_SENSITIVE_NODES,
            sensitive_bits: int | None = INT4_SENSITIVE_BITS, exact_grid: bool = True) -> dict[str, int]:
    """Quantize ``model_path``'s MatMul weights to 4 bits (MatMulNBits) in place; returns counts per kind.

    Weights already on a Q4_1 / Q8_0 block grid (a GGUF source) are stored exactly
    (``block_grid``) unless ``exact_grid`` is False. The rest are quantized: MatMuls whose name
    matches ``sensitive`` get ``sensitive_bits`` (8: MatMulNBits too) or stay float (None).
    Keyword arguments override the module defaults (``bench/quality.py --sweep``).
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    external = _size(model_path) // 4 > EXTERNAL_DATA_BYTES
    model = onnx.load(str(model_path))
    rewritten = gemm_to_matmul(model)
    if rewritten:
        log.info("Rewrote %d Gemm nodes as MatMul + Add so they can be quantized", rewritten)
    if untied := untie_lm_head(model):
        log.info("Gave %d tied MatMul(s) (the LM head) their own transposed weight so they can be quantized", untied)
    level = INT4_ACCURACY_LEVEL if accuracy_level is None else accuracy_level
    counts = import_grid_weights(model, level) if exact_grid else {"exact_4bit": 0, "exact_8bit": 0, "exact_gather": 0}
    if any(counts.values()):
        log.info("int4: weights taken exactly from their block grid: %d MatMuls 4-bit (Q4_1), %d MatMuls and "
                 "%d embedding Gathers 8-bit (Q8_0)", counts["exact_4bit"], counts["exact_8bit"], counts["exact_gather"])
    held = [n.name for n in model.graph.node if n.op_type == "MatMul" and sensitive is not None and sensitive.search(n.name)]
    offsets = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name.endswith(OFFSETS_SUFFIX)]
    passes = [(4, held + offsets)] + ([(sensitive_bits, offsets)] if sensitive_bits and held else [])
    for bits, excluded in passes:  # 4 bits first, sparing the sensitive ones; then those (the only MatMuls left)
        quantizer = MatMulNBitsQuantizer(
            model, bits=bits, block_size=block_size or INT4_BLOCK_SIZE,
            is_symmetric=INT4_SYMMETRIC if symmetric is None else symmetric,
            accuracy_level=level, nodes_to_exclude=excluded, op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
        model = quantizer.model.model
    bits_of = [next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node if n.op_type == "MatMulNBits"]
    counts["quantized_4bit"] = bits_of.count(4) - counts["exact_4bit"]
    counts["quantized_8bit"] = bits_of.count(8) - counts["exact_8bit"]
    counts["float"] = 0 if sensitive_bits else len(held)
    log.info("int4: %d MatMulNBits with 4 bits, %d with 8 bits, %d sensitive MatMuls kept float",
             bits_of.count(4), bits_of.count(8), counts["float"])
    new_path = _scratch(model_path)
    save(model, new_path, external=external)
    _install(new_path, model_path)
    return counts


def optimize(model_path: Path, dtype: str) -> dict[str, int]:
    """Turn the fp32 graph at ``model_path`` into ``dtype`` (``fp32``/``fp16``/``int8``/``int4``), in place.

    Returns how the weights were stored (int4: ``to_int4``'s counts; other dtypes: empty).
    """
    if dtype == "fp32":
        log.info("fp32: keeping the exported graph as is")
        return {}
    convert = {"fp16": to_fp16, "int8": to_int8, "int4": to_int4}.get(dtype)
    if convert is None:
        raise ExportError(f"Unknown dtype {dtype!r}; choose fp32, fp16, int8 or int4.")
    before = _size(model_path)
    try:
        with heartbeat(f"converting to {dtype}"):
            counts = convert(model_path) or {}
    except OSError:
        raise
    except Exception as exc:  # onnx / onnxruntime tools raise assorted types
        raise ExportError(f"Converting the graph to {dtype} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(model_path.parent / f".{SCRATCH}", ignore_errors=True)
    log.info("%s graph: %.1f MB (fp32 was %.1f MB)", dtype, _size(model_path) / 1e6, before / 1e6)
    return counts
