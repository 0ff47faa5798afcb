"""Each row's top-k logits, computed where the logits are: what sampling needs, without the vocabulary.

A sampled step used to bring every row's whole logits row to the host and filter it there (repetition
penalty, n-gram bans, temperature, top-k, top-p): about 0.5 ms of numpy per row for a 49k vocabulary
(on top of the copy from the GPU). Sampling with ``top_k`` = 40 only ever picks among a row's 40
best processed logits, and the processors only lower tokens (penalties, bans) or raise a few known
ones (steering), so the ``k`` best raw logits decide the pick in almost every step.

``TopK`` runs ONNX Runtime's TopK over a logits tensor on its own device (an ``OrtValue`` the
decoder left on the GPU, or a host array) and returns ``TopTokens``: ids and values (rows, k) plus a
way to fetch the full logits for the rows the candidates cannot decide.
``sampling.Sampler.pick`` makes the choice from the candidates and says when they are not enough,
so the result is always the same as from the full row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

log = logging.getLogger(__name__)

DEFAULT_TOP_TOKENS = 64  # candidates per row: covers the chat default top_k 40 with room for penalised ones
# Vocabularies up to this size are processed whole: through the socket, greedy with steering, a
# 1,000-token tiny model ran 10-25% slower by way of candidates (bench/results/concurrency-*-topk-*).
# The real models' 32k-50k vocabularies are far above it.
MIN_VOCAB = 4096
_IR_VERSION = 10  # what ONNX Runtime 1.31 loads (onnx 1.23 would write a newer one)


@dataclass
class TopTokens:
    """Rows' ``k`` largest logits: ``ids`` int64 and ``values`` float32, (rows, k), in no set order.
    ``row(i)`` gives row ``i``'s whole logits (1, vocab), for a row the candidates cannot decide."""

    ids: np.ndarray
    values: np.ndarray
    row: Callable[[int], np.ndarray]


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], initializers: list[Any]) -> bytes:
    graph = helper.make_graph(nodes, "npctalk_topk", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = _IR_VERSION
    return model.SerializeToString()


def _topk_graph(k: int) -> bytes:
    """logits (..., vocab) float32 → values, ids (..., k): ONNX TopK on the last axis."""
    return _model([helper.make_node("TopK", ["logits", "k"], ["values", "ids"], axis=-1, largest=1, sorted=0)],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                  [helper.make_tensor_value_info("values", TensorProto.FLOAT, None),
                   helper.make_tensor_value_info("ids", TensorProto.INT64, None)],
                  [helper.make_tensor("k", TensorProto.INT64, [1], [k])])


def _row_graph() -> bytes:
    """logits (rows, ..., vocab), index (1,) → that row (1, ..., vocab): one row off the device."""
    return _model([helper.make_node("Gather", ["logits", "index"], ["row"], axis=0)],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
                   helper.make_tensor_value_info("index", TensorProto.INT64, [1])],
                  [helper.make_tensor_value_info("row", TensorProto.FLOAT, None)], [])


class TopK:
    """A ``k``-largest session on ``device`` (``"cpu"`` or ``"cuda"``). Not thread-safe."""

    def __init__(self, k: int, device: str = "cpu", *, threads: int = 1, gather: bool | None = None) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        self.k, self.device = k, device
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda"
            else ["CPUExecutionProvider"])
        self.session = ort.InferenceSession(_topk_graph(k), options, providers=providers)
        # Off the host, a row the candidates cannot decide is gathered on the device (one row copied);
        # ``gather``: whether to (default: unless on the CPU, where the logits are host memory already).
        gather = device != "cpu" if gather is None else gather
        self._rows = ort.InferenceSession(_row_graph(), options, providers=providers) if gather else None

    def of_array(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Host logits (rows, vocab) → (ids, values), each (rows, min(k, vocab))."""
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        if logits.shape[-1] <= self.k:  # TopK refuses k beyond the axis: every token is a candidate
            ids = np.broadcast_to(np.arange(logits.shape[-1], dtype=np.int64), logits.shape)
            return np.ascontiguousarray(ids), logits
        values, ids = self.session.run(None, {"logits": logits})
        return ids.reshape(logits.shape[0], -1), values.reshape(logits.shape[0], -1)

    def of_value(self, logits: ort.OrtValue, vocab: int) -> tuple[np.ndarray, np.ndarray]:
        """Logits left on the device (rows, [1,] vocab) → host (ids, values), each (rows, k): only
        these 12 bytes per candidate leave the device."""
        if vocab <= self.k:
            return self.of_array(logits.numpy().reshape(-1, vocab))
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("logits", logits)
        binding.bind_output("values", "cpu")
        binding.bind_output("ids", "cpu")
        self.session.run_with_iobinding(binding)
        values, ids = binding.copy_outputs_to_cpu()
        return ids.reshape(-1, self.k), values.reshape(-1, self.k)

    def row_of_value(self, logits: ort.OrtValue, index: int, vocab: int) -> np.ndarray:
        """Row ``index`` of logits left on the device, as host (1, vocab): one row copied, not all."""
        if self._rows is None:  # host memory already
            return logits.numpy().reshape(-1, vocab)[index:index + 1]
        binding = self._rows.io_binding()
        binding.bind_ortvalue_input("logits", logits)
        binding.bind_cpu_input("index", np.array([index], dtype=np.int64))
        binding.bind_output("row", "cpu")
        self._rows.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].reshape(1, vocab)


@lru_cache(maxsize=4)
def host_topk(k: int) -> TopK:
    """The process's CPU ``TopK`` for host logits (one per ``k``)."""
    return TopK(k, "cpu")
