"""Step 1 of export: PyTorch decoder → one ONNX graph with KV cache (past in, present out).

optimum's ``text-generation-with-past`` export gives exactly the bundle's I/O contract (see
``npctalk.engine.bundle``): past of length 0 makes the same graph do prefill. The graph is traced
on the CPU in fp32 whatever the target; ``optimize.py`` makes fp16/int8 variants from it.

``describe_graph`` reads back which inputs the graph really has, so the manifest states them
exactly. The TorchScript exporter silently drops inputs the traced code never reads; with the
pinned stack (torch 2.13, transformers 4.57, optimum-onnx 0.1) GPT-2 and Llama graphs both keep
``attention_mask`` and ``position_ids``, and validation checks they are honoured (left padding).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from npctalk.engine.bundle import DEFAULT_IO
from npctalk.engine.errors import ExportError

from .progress import heartbeat

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

OPSET = 18  # optimum's recommended minimum for gpt2/llama; LayerNormalization is native from 17
MODEL_FILE = "model.onnx"
_DATA_FILES = ("model.onnx_data", "model.onnx.data")
_ONNX_FLOAT = {1: "fp32", 10: "fp16", 16: "bf16"}


def convert_to_onnx(model: PreTrainedModel, out_dir: Path) -> Path:
    """Export ``model`` (fp32, CPU) as ``out_dir/model.onnx`` (+ external data when large); return the path.

    Runs optimum without its own validation: ours (``validate.py``) checks prefill and cached decode.
    An ``OSError`` (e.g. disk full) propagates unchanged for the caller to report.
    """
    import torch
    from optimum.exporters.onnx import onnx_export_from_model

    out_dir.mkdir(parents=True, exist_ok=True)
    # optimum writes config/generation files beside the graph; keep only the graph.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".optimum-") as tmp, warnings.catch_warnings():
        # Tracing a HF model always warns about Python control flow on shapes; the graph is checked
        # by validation instead, so these warnings would only bury the progress lines.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
        try:
            with heartbeat("tracing the model to ONNX"):
                onnx_export_from_model(
                    model, tmp, opset=OPSET, task="text-generation-with-past",
                    do_validation=False, device="cpu",
                )
        except OSError:
            raise
        except Exception as exc:  # optimum and torch.onnx raise many unrelated exception types
            raise ExportError(f"optimum could not export the decoder to ONNX: {type(exc).__name__}: {exc}") from exc
        produced = Path(tmp)
        if not (produced / MODEL_FILE).is_file():
            raise ExportError(f"optimum finished but wrote no model.onnx (found: {sorted(p.name for p in produced.iterdir())}).")
        for name in (MODEL_FILE, *_DATA_FILES):
            if (produced / name).exists():
                shutil.move(str(produced / name), out_dir / name)
    _rename_external_data(out_dir / MODEL_FILE)
    log.info("ONNX graph written: %s", out_dir / MODEL_FILE)
    return out_dir / MODEL_FILE


def _rename_external_data(model_path: Path) -> None:
    """optimum names external weights ``model.onnx_data``; the bundle contract says ``model.onnx.data``."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    old = model_path.with_name(model_path.name + "_data")
    if not old.exists():
        return
    new_name = model_path.name + ".data"
    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = new_name
    onnx.save(model, str(model_path))  # tensors without raw data stay external, untouched
    old.rename(model_path.with_name(new_name))


@dataclass(frozen=True)
class GraphIO:
    """What an exported graph takes and returns, as the manifest records it.

    ``io`` maps roles to names (``DEFAULT_IO`` shape; ``attention_mask``/``position_ids`` are None
    when the graph lacks them). ``kv_dtype`` is the element type of the past inputs, ``fp32``/``fp16``.
    """

    io: dict[str, Any]
    kv_dtype: str
    logits_dtype: str
    input_names: tuple[str, ...]


def describe_graph(model_path: Path, num_layers: int) -> GraphIO:
    """Read the graph's inputs/outputs (not its weights) and check them against the bundle contract."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    inputs = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    outputs = {o.name: o.type.tensor_type.elem_type for o in graph.output}
    io = dict(DEFAULT_IO)
    missing = [n for n in ("input_ids",) if n not in inputs] + [n for n in ("logits",) if n not in outputs]
    for layer in range(num_layers):
        missing += [n for n in (io["past_key"].format(layer=layer), io["past_value"].format(layer=layer)) if n not in inputs]
        missing += [n for n in (io["present_key"].format(layer=layer), io["present_value"].format(layer=layer))
                    if n not in outputs]
    if missing:
        raise ExportError(
            f"The exported graph lacks {missing[:4]} (inputs {sorted(inputs)}); it does not fit the bundle contract."
        )
    slots = io["seqlens_k"] in inputs
    for role in ("attention_mask", "position_ids"):
        if role not in inputs and not (slots and role == "attention_mask"):
            log.warning("The exported graph has no %s input; the runtime cannot batch left-padded streams with it.", role)
        if role not in inputs:
            io[role] = None
    for role in ("seqlens_k", "total_sequence_length"):  # the slots layout's inputs (lean CUDA graphs)
        if io[role] not in inputs:
            io[role] = None
    if io["next_token"] not in outputs:
        io["next_token"] = None
    if slots and (io["total_sequence_length"] is None or io["position_ids"] is None):
        raise ExportError("The graph takes seqlens_k but not total_sequence_length and position_ids; "
                          "it fits neither the mask nor the slots layout.")
    extra = sorted(set(inputs) - {v for v in io.values() if isinstance(v, str)} - {io["past_key"].format(layer=i) for i in range(num_layers)}
                   - {io["past_value"].format(layer=i) for i in range(num_layers)})
    if extra:
        raise ExportError(f"The exported graph has inputs the bundle contract does not know: {extra}.")
    past_type = inputs[io["past_key"].format(layer=0)]
    if past_type not in (1, 10):
        raise ExportError(f"The graph's past inputs have ONNX element type {past_type}; expected float32 or float16.")
    return GraphIO(io, _ONNX_FLOAT[past_type], _ONNX_FLOAT.get(outputs["logits"], str(outputs["logits"])),
                   tuple(inputs))
