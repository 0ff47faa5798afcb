"""A KV slot's first positions copied out, and back into another slot: persona-prefix snapshots on slots.

The mask-layout ``Model`` shares a persona prefix's KV arrays between turns (``prefix_cache.py``).
A KV slot of the slot decoder cannot be shared, so its prefix is copied:

- ``take(slot, n)``: the first ``n`` positions of every layer's keys and values in ``slot`` become
  arrays of their own, (1, kv_heads, n, head_dim) each, on the decoder's device: a ``SlotSnapshot``.
  ``n`` may be less than what the slot holds (causal attention: the first ``n`` positions' KV
  depends on the first ``n`` tokens only), so a prompt read whole yields its prefix's snapshot.
- ``put(slot, snapshot)``: the snapshot written into ``slot``; the slot then holds ``n`` tokens.

On the GPU each is one run of a small ONNX graph (a Slice, or a Pad, per tensor) bound at the
slot's address, so nothing leaves the device. A slot is (kv_heads, capacity + 1, head_dim) with
heads outermost, so its first ``n`` positions are not one block, and a graph output is: ``put``
writes the whole slot (the snapshot, then zeros), about 100 MB for DialoGPT-medium's 1,024-token
fp16 slot. On the CPU provider the buffers are host arrays and numpy copies the ``n`` positions
alone; ``graph=True`` runs the GPU's graphs there instead (how CI tests them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from . import onnx_proto as proto
from .errors import GenerationError


@dataclass(frozen=True)
class SlotSnapshot:
    """``length`` positions of every layer: ``tensors`` are keys then values per layer, each
    (1, kv_heads, length, head_dim), numpy arrays or ``OrtValue``s on the decoder's device."""

    length: int
    tensors: tuple[Any, ...]
    nbytes: int


def _take_graph(count: int, element: int) -> bytes:
    """kv{i} (1, heads, positions, dim), length (1,) → snap{i} = kv{i}[:, :, :length]."""
    nodes = [proto.node("Slice", [f"kv{i}", "zero", "length", "axis"], [f"snap{i}"]) for i in range(count)]
    return proto.model(nodes, [proto.tensor_info(f"kv{i}", element, None) for i in range(count)]
                       + [proto.tensor_info("length", proto.INT64, [1])],
                       [proto.tensor_info(f"snap{i}", element, None) for i in range(count)],
                       [proto.int64_tensor("zero", [1], [0]), proto.int64_tensor("axis", [1], [2])],
                       name="npctalk_slot_take")


def _put_graph(count: int, element: int) -> bytes:
    """snap{i} (1, heads, n, dim), pads (8,) → kv{i} = snap{i} zero-padded along the positions."""
    nodes = [proto.node("Pad", [f"snap{i}", "pads"], [f"kv{i}"], mode="constant") for i in range(count)]
    return proto.model(nodes, [proto.tensor_info(f"snap{i}", element, None) for i in range(count)]
                       + [proto.tensor_info("pads", proto.INT64, [8])],
                       [proto.tensor_info(f"kv{i}", element, None) for i in range(count)],
                       name="npctalk_slot_put")


def graphs(count: int, element: int) -> dict[str, bytes]:
    """The copy graphs for ``count`` tensors of ONNX type ``element``, by name: for checking where a
    device places their nodes."""
    return {"take": _take_graph(count, element), "put": _put_graph(count, element)}


class SlotCopier:
    """Copies between ``buffers`` (every layer's keys then values, (slots, kv_heads, physical,
    head_dim) each, ``OrtValue``s on ``device``) and snapshots. ``arrays``: the host arrays the
    buffers wrap on the CPU (numpy copies), None on a GPU. Not thread-safe."""

    def __init__(self, buffers: Sequence[ort.OrtValue], arrays: Sequence[np.ndarray] | None, dtype: np.dtype,
                 device: str, *, graph: bool = False) -> None:
        self.buffers, self.device = list(buffers), device
        self.arrays = None if graph or arrays is None else list(arrays)
        self.dtype = np.dtype(dtype)
        shape = buffers[0].shape()
        self.slot_shape = [1, *shape[1:]]  # (1, kv_heads, physical, head_dim)
        self.slot_bytes = int(np.prod(shape[1:])) * self.dtype.itemsize
        self._sessions: dict[str, ort.InferenceSession] = {}

    @property
    def graph(self) -> bool:
        """Whether copies run as ONNX graphs (always on a GPU)."""
        return self.arrays is None

    def take(self, slot: int, n: int) -> SlotSnapshot:
        """The first ``n`` positions of ``slot`` as a snapshot of their own."""
        heads, head_dim = self.slot_shape[1], self.slot_shape[3]
        nbytes = len(self.buffers) * heads * n * head_dim * self.dtype.itemsize
        if self.arrays is not None:
            return SlotSnapshot(n, tuple(a[slot:slot + 1, :, :n].copy() for a in self.arrays), nbytes)
        session = self._session("take")
        binding = session.io_binding()
        for i, buffer in enumerate(self.buffers):
            binding.bind_input(f"kv{i}", self.device, 0, self.dtype.type, self.slot_shape,
                               buffer.data_ptr() + slot * self.slot_bytes)
            binding.bind_output(f"snap{i}", self.device)  # ONNX Runtime allocates it on the device
        binding.bind_cpu_input("length", np.array([n], dtype=np.int64))
        session.run_with_iobinding(binding)
        return SlotSnapshot(n, tuple(binding.get_outputs()), nbytes)

    def put(self, slot: int, snapshot: SlotSnapshot) -> None:
        """Write ``snapshot`` into ``slot`` (what the slot held is overwritten)."""
        n = snapshot.length
        want = (1, self.slot_shape[1], n, self.slot_shape[3])
        shapes = {tuple(t.shape if isinstance(t, np.ndarray) else t.shape()) for t in snapshot.tensors}
        if len(snapshot.tensors) != len(self.buffers) or shapes != {want}:
            raise GenerationError(f"The snapshot does not fit this decoder's KV: {len(snapshot.tensors)} tensors of "
                                  f"{sorted(shapes)}, want {len(self.buffers)} of {want} (another model's snapshot?).")
        if self.arrays is not None:
            for array, tensor in zip(self.arrays, snapshot.tensors):
                array[slot:slot + 1, :, :n] = tensor
            return
        session = self._session("put")
        binding = session.io_binding()
        for i, (buffer, tensor) in enumerate(zip(self.buffers, snapshot.tensors)):
            if isinstance(tensor, np.ndarray):
                binding.bind_cpu_input(f"snap{i}", tensor)
            else:
                binding.bind_ortvalue_input(f"snap{i}", tensor)
            binding.bind_output(f"kv{i}", self.device, 0, self.dtype.type, self.slot_shape,
                                buffer.data_ptr() + slot * self.slot_bytes)
        binding.bind_cpu_input("pads", np.array([0, 0, 0, 0, 0, 0, self.slot_shape[2] - n, 0], dtype=np.int64))
        session.run_with_iobinding(binding)

    def _session(self, kind: str) -> ort.InferenceSession:
        session = self._sessions.get(kind)
        if session is None:
            model = graphs(len(self.buffers), proto.ELEMENT_TYPES[self.dtype.name])[kind]
            # Snapshots live in this session's arena: chunks of the size asked for, as the decoder's buffers.
            session = self._sessions[kind] = proto.session(model, self.device,
                                                           cuda_options={"arena_extend_strategy": "kSameAsRequested"})
        return session
