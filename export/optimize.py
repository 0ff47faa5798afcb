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
  projections: for the CPU execution provider. KV cache and logits stay float32.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from npctalk.engine.errors import ExportError

from .progress import heartbeat

log = logging.getLogger(__name__)

# ONNX protobufs cannot exceed 2 GiB; above this size weights go to one external data file.
EXTERNAL_DATA_BYTES = 1_800_000_000
KEEP_FLOAT32 = ["logits"]
# int8: the MLP down projection's input (after the gated activation) carries the model's outlier
# activations; one per-tensor uint8 scale for it wrecks every other token. Keeping these MatMuls in
# fp32 cut SmolLM2-135M's worst prefill logit error from 18.8 to 5.1 (bundle +80 MB).
KEEP_FP32_NODES = re.compile(r"/mlp/(down_proj|c_proj)/")


def _data_files(model_path: Path) -> list[Path]:
    return [p for p in (model_path.with_name(model_path.name + "_data"), model_path.with_name(model_path.name + ".data"))
            if p.exists()]


def _size(model_path: Path) -> int:
    return model_path.stat().st_size + sum(p.stat().st_size for p in _data_files(model_path))


def _replace(model_path: Path, new_path: Path) -> None:
    """Move ``new_path`` (and its ``.data`` file) over ``model_path``, removing the old external data."""
    for old in _data_files(model_path):
        old.unlink()
    for data in _data_files(new_path):
        data.rename(model_path.with_name(model_path.name + ".data"))
    new_path.replace(model_path)


def to_fp16(model_path: Path) -> None:
    """Convert ``model_path`` to float16 in place (inputs/outputs float16 except ``logits``)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(model_path))
    model = convert_float_to_float16(model, keep_io_types=KEEP_FLOAT32, disable_shape_infer=_size(model_path) > EXTERNAL_DATA_BYTES)
    tmp = model_path.with_name("fp16.tmp.onnx")
    external = _size(model_path) // 2 > EXTERNAL_DATA_BYTES
    onnx.save(model, str(tmp), save_as_external_data=external, all_tensors_to_one_file=True,
              location=tmp.name + ".data" if external else None)
    _replace(model_path, tmp)


def int8_excluded_nodes(model_path: Path) -> list[str]:
    """Nodes left in fp32 by ``to_int8``: the MLP down projections (see ``KEEP_FP32_NODES``)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and KEEP_FP32_NODES.search(n.name)]


def to_int8(model_path: Path) -> None:
    """Quantize ``model_path``'s weights to int8 in place (dynamic quantization for the CPU provider)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = model_path.with_name("int8.tmp.onnx")
    quantize_dynamic(
        model_path, tmp, weight_type=QuantType.QInt8, per_channel=True,
        nodes_to_exclude=int8_excluded_nodes(model_path),
        use_external_data_format=_size(model_path) // 4 > EXTERNAL_DATA_BYTES,
        extra_options={"MatMulConstBOnly": True},
    )
    _replace(model_path, tmp)


def optimize(model_path: Path, dtype: str) -> None:
    """Turn the fp32 graph at ``model_path`` into ``dtype`` (``fp32``/``fp16``/``int8``), in place."""
    if dtype == "fp32":
        log.info("fp32: keeping the exported graph as is")
        return
    convert = {"fp16": to_fp16, "int8": to_int8}.get(dtype)
    if convert is None:
        raise ExportError(f"Unknown dtype {dtype!r}; choose fp32, fp16 or int8.")
    before = _size(model_path)
    try:
        with heartbeat(f"converting to {dtype}"):
            convert(model_path)
    except OSError:
        raise
    except Exception as exc:  # onnx / onnxruntime tools raise assorted types
        raise ExportError(f"Converting the graph to {dtype} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        for leftover in model_path.parent.glob("*.tmp.onnx*"):
            leftover.unlink()
    log.info("%s graph: %.1f MB (fp32 was %.1f MB)", dtype, _size(model_path) / 1e6, before / 1e6)
