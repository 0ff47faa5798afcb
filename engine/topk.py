"""Each row's top-k logits, computed where the logits are: what sampling needs, without the vocabulary.

A sampled step used to bring every row's whole logits row to the host and filter it there (repetition
penalty, n-gram bans, temperature, top-k, top-p): about 0.5 ms of numpy per row for a 49k vocabulary
(on top of the copy from the GPU). Sampling with ``top_k`` = 40 only ever picks among a row's 40
best processed logits, and the processors only lower tokens (penalties, bans) or raise a few known
ones (steering), so the ``k`` best raw logits decide the pick in almost every step.

``TopK`` runs ONNX Runtime's TopK over a logits tensor on its own device (an ``OrtValue`` the
decoder left on the GPU, or a host array) and returns ``TopTokens``: ids and values (rows, k) plus a
way to fetch the full logits for the rows the candidates cannot decide.
``pick.pick_many`` makes the choice from the candidates and says when they are not enough, so the
result is always the same as from the full row.

A row with a logit bonus (fact steering; the ban on EOS before the reply says something) gets it
added on the device before the top k are taken (``Bonus``: ScatterElements with ``add``), so a
steered token outside the raw top k is still a candidate and the pick needs no other row. The
values returned are then the bonused logits, as ``sampling.add_bonus`` would make them (the same
float32 sums).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import onnxruntime as ort

from . import onnx_proto as proto

log = logging.getLogger(__name__)

DEFAULT_TOP_TOKENS = 64  # candidates per row: covers the chat default top_k 40 with room for penalised ones
# Vocabularies up to this size are processed whole: through the socket, greedy with steering, a
# 1,000-token tiny model ran 10-25% slower by way of candidates (bench/results/concurrency-*-topk-*).
# The real models' 32k-50k vocabularies are far above it.
MIN_VOCAB = 4096


@dataclass
class TopTokens:
    """Rows' ``k`` largest logits: ``ids`` int64 and ``values`` float32, (rows, k), in no set order.
    ``row(i)`` gives row ``i``'s whole raw logits (1, vocab), for a row the candidates cannot decide.
    ``bonused``: the values (and so the choice of candidates) include the rows' bonuses."""

    ids: np.ndarray
    values: np.ndarray
    row: Callable[[int], np.ndarray]
    bonused: bool = False


@dataclass(frozen=True)
class Bonus:
    """Logit bonuses of a step's rows as two (rows, width) arrays: token ids int64 and amounts
    float32. A row with fewer bonuses is padded with (0, 0.0), which adds nothing."""

    ids: np.ndarray
    values: np.ndarray

    @classmethod
    def of(cls, bonuses: Sequence[Mapping[int, float]], rows: int, at: Sequence[int] | None = None) -> Bonus | None:
        """``bonuses[i]`` (token → logits) for logits row ``at[i]`` (default ``i``) of ``rows``; None
        when there is none at all."""
        width = max((len(b) for b in bonuses), default=0)
        if width == 0:
            return None
        ids = np.zeros((rows, width), dtype=np.int64)
        values = np.zeros((rows, width), dtype=np.float32)
        for i, bonus in enumerate(bonuses):
            if bonus:
                row = i if at is None else at[i]
                ids[row, :len(bonus)] = np.fromiter(bonus, dtype=np.int64, count=len(bonus))
                values[row, :len(bonus)] = np.fromiter(bonus.values(), dtype=np.float32, count=len(bonus))
        return cls(ids, values)


def _topk_graph(k: int) -> bytes:
    """logits (..., vocab) float32 → values, ids (..., k): ONNX TopK on the last axis."""
    return proto.model([proto.node("TopK", ["logits", "k"], ["values", "ids"], axis=-1, largest=1, sorted=0)],
                       [proto.tensor_info("logits", proto.FLOAT, None)],
                       [proto.tensor_info("values", proto.FLOAT, None), proto.tensor_info("ids", proto.INT64, None)],
                       [proto.int64_tensor("k", [1], [k])], name="npctalk_topk")


def _bonused_topk_graph(k: int) -> bytes:
    """logits (rows, [1,] vocab), bonus_ids and bonus_values (rows, width) → values, ids (rows, k):
    the bonus added to its tokens' logits (ScatterElements, ``add``), then TopK."""
    return proto.model([proto.node("Flatten", ["logits"], ["flat"], axis=1),  # (rows, vocab)
                        proto.node("ScatterElements", ["flat", "bonus_ids", "bonus_values"], ["bonused"],
                                   axis=1, reduction="add"),
                        proto.node("TopK", ["bonused", "k"], ["values", "ids"], axis=-1, largest=1, sorted=0)],
                       [proto.tensor_info("logits", proto.FLOAT, None),
                        proto.tensor_info("bonus_ids", proto.INT64, [None, None]),
                        proto.tensor_info("bonus_values", proto.FLOAT, [None, None])],
                       [proto.tensor_info("values", proto.FLOAT, None), proto.tensor_info("ids", proto.INT64, None)],
                       [proto.int64_tensor("k", [1], [k])], name="npctalk_topk",
                       opset=18)  # ONNX Runtime's CUDA ScatterElements with a reduction is registered for opset 18


def graphs(k: int) -> dict[str, bytes]:
    """The graphs ``TopK`` runs, by name: for checking where a device places their nodes."""
    return {"topk": _topk_graph(k), "bonused_topk": _bonused_topk_graph(k), "row": _row_graph()}


def _row_graph() -> bytes:
    """logits (rows, ..., vocab), index (1,) → that row (1, ..., vocab): one row off the device."""
    return proto.model([proto.node("Gather", ["logits", "index"], ["row"], axis=0)],
                       [proto.tensor_info("logits", proto.FLOAT, None), proto.tensor_info("index", proto.INT64, [1])],
                       [proto.tensor_info("row", proto.FLOAT, None)], name="npctalk_topk")


class TopK:
    """A ``k``-largest session on ``device`` (``"cpu"`` or ``"cuda"``). Not thread-safe."""

    def __init__(self, k: int, device: str = "cpu", *, threads: int = 1, gather: bool | None = None) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        self.k, self.device = k, device
        self.session = proto.session(_topk_graph(k), device, threads=threads)
        self._bonused = proto.session(_bonused_topk_graph(k), device, threads=threads)
        # Off the host, a row the candidates cannot decide is gathered on the device (one row copied);
        # ``gather``: whether to (default: unless on the CPU, where the logits are host memory already).
        gather = device != "cpu" if gather is None else gather
        self._rows = proto.session(_row_graph(), device, threads=threads) if gather else None

    def of_array(self, logits: np.ndarray, bonus: Bonus | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Host logits (rows, vocab) → (ids, values), each (rows, min(k, vocab)); with ``bonus``,
        of the bonused logits (``logits`` itself is not changed)."""
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        if logits.shape[-1] <= self.k:  # TopK refuses k beyond the axis: every token is a candidate
            if bonus is not None:
                logits = logits.copy()
                np.add.at(logits, (np.arange(logits.shape[0])[:, None], bonus.ids), bonus.values)
            ids = np.broadcast_to(np.arange(logits.shape[-1], dtype=np.int64), logits.shape)
            return np.ascontiguousarray(ids), logits
        if bonus is None:
            values, ids = self.session.run(None, {"logits": logits})
        else:
            values, ids = self._bonused.run(None, {"logits": logits, "bonus_ids": bonus.ids, "bonus_values": bonus.values})
        return ids.reshape(logits.shape[0], -1), values.reshape(logits.shape[0], -1)

    def of_value(self, logits: ort.OrtValue, vocab: int, bonus: Bonus | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Logits left on the device (rows, [1,] vocab) → host (ids, values), each (rows, k): only
        these 12 bytes per candidate leave the device (and ``bonus``'s arrays go to it)."""
        if vocab <= self.k:
            return self.of_array(logits.numpy().reshape(-1, vocab), bonus)
        session = self.session if bonus is None else self._bonused
        binding = session.io_binding()
        binding.bind_ortvalue_input("logits", logits)
        if bonus is not None:
            binding.bind_cpu_input("bonus_ids", bonus.ids)
            binding.bind_cpu_input("bonus_values", bonus.values)
        binding.bind_output("values", "cpu")
        binding.bind_output("ids", "cpu")
        session.run_with_iobinding(binding)
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
