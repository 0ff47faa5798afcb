"""npctalk's own decoder graph ("lean"), written node by node from the PyTorch weights.

optimum's traced export spends ~270 ONNX nodes per layer, mostly shape arithmetic; on a CPU the
per-node overhead then dominates decoding a small model. The lean graph is a handful of ONNX Runtime
contrib ops per layer (SkipLayerNorm / RMSNorm, RotaryEmbedding, GroupQueryAttention, FastGelu)
around plain MatMuls, with the bundle's I/O contract (``npctalk.engine.bundle``) except that
``logits`` is the last position only, (batch, 1, vocab).

``build_lean_graph`` writes ``model.onnx`` (+ ``model.onnx.data`` above the protobuf limit) in fp32
or fp16; int8/int4 come from ``optimize.py`` quantizing the fp32 lean graph like any other.
Modules: ``graph`` (builder and shared parts), ``gpt2``, ``llama``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from npctalk.engine.bundle import DEFAULT_IO
from npctalk.engine.errors import ExportError, UnsupportedModelError

from . import gpt2, llama
from .graph import GraphBuilder

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
BUILDERS = {"gpt2": gpt2.build, "llama": llama.build}


def build_lean_graph(model: Any, architecture: str, out_dir: Path, dtype: str = "fp32",
                     untie_lm_head: bool = False, layout: str = "mask") -> Path:
    """Write ``model``'s lean decoder graph to ``out_dir/model.onnx``; return the path.

    ``dtype``: ``fp32`` or ``fp16`` (weights, activations and KV cache; logits stay float32).
    ``untie_lm_head``: give a tied LM head its own (hidden, vocab) MatMul weight instead of reusing the
    embedding through Gemm(transB=1), for the quantizers (which need a constant (K, N) MatMul operand).
    """
    build = BUILDERS.get(architecture)
    if build is None:
        raise UnsupportedModelError(f"The lean graph has no builder for {architecture!r}; use --graph optimum.")
    if model.config.vocab_size != model.get_output_embeddings().weight.shape[0]:
        raise UnsupportedModelError("The LM head's size differs from config.vocab_size; use --graph optimum.")
    builder = GraphBuilder(f"npctalk-lean-{architecture}", dtype)
    build(model, builder, dict(DEFAULT_IO), untie_lm_head=untie_lm_head, layout=layout)
    onnx_model = builder.model("npctalk-lean")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILE
    weight_bytes = sum(len(t.raw_data) for t in onnx_model.graph.initializer)
    from .. import optimize

    # A protobuf cannot exceed 2 GiB: above optimize's threshold the weights go to model.onnx.data.
    optimize.save(onnx_model, path, external=weight_bytes > optimize.EXTERNAL_DATA_BYTES)
    if not path.is_file():
        raise ExportError(f"Writing the lean graph to {path} produced no file.")
    log.info("Lean ONNX graph written: %s (%d nodes for %d layers, %.1f MB of weights, %s, %s layout)", path,
             len(onnx_model.graph.node), model.config.num_hidden_layers, weight_bytes / 1e6, dtype, layout)
    return path
