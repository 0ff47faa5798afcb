"""The KV cache: every layer's past keys and values, plus the attention mask that goes with them.

Arrays live in host memory as numpy, in the bundle's ``kv_dtype``::

    keys[layer], values[layer]   (batch, kv_heads, length, head_dim)
    mask                         (batch, length) int64, 1 for a real token, 0 for padding

Two ways a step extends the cache (``Model.forward`` picks):

- **in place** (lean graphs on the CPU): the cache owns buffers with spare room along the length
  axis (``reserve``), bound as both ``past.*`` and ``present.*``; GroupQueryAttention writes the new
  positions into them and nothing else moves. Room grows in chunks, so a step copies the cache
  only when a chunk fills up, instead of every token.
- **plain**: the arrays are replaced by the graph's ``present.*`` outputs (ONNX Runtime allocates
  them and copies the whole past into them each step).

Positions a caller has seen are never written again: in-place writes go only after ``length``, and
any other change (``update``, ``rewind``, assigning ``keys``/``values``) gives up the owned buffers,
so the next in-place step copies into fresh ones. That keeps shared snapshots (the prefix cache)
safe. ``rewind(n)`` keeps the first ``n`` positions: that is how a persona's prefix is computed once
and reused every turn. Not thread-safe: one cache per generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .bundle import Manifest
from .errors import GenerationError

KV_DTYPES = {"fp32": np.float32, "fp16": np.float16}


class KVCache:
    """Past keys/values of ``num_layers`` layers for ``batch_size`` streams of equal length."""

    def __init__(self, num_layers: int, batch_size: int, kv_heads: int, head_dim: int, dtype: type) -> None:
        empty = np.zeros((batch_size, kv_heads, 0, head_dim), dtype=dtype)  # (batch, kv_heads, 0, head_dim)
        self._keys: list[np.ndarray] = [empty] * num_layers     # (batch, kv_heads, capacity, head_dim)
        self._values: list[np.ndarray] = [empty] * num_layers
        self._owned = False  # the buffers were allocated by ``reserve`` and nobody else has seen past ``length``
        self.mask = np.zeros((batch_size, 0), dtype=np.int64)  # (batch, length)
        self.binding: Any = None  # the model's IOBinding of the owned buffers (opaque here); None when they change

    @classmethod
    def for_manifest(cls, manifest: Manifest, batch_size: int = 1) -> KVCache:
        """An empty cache shaped for the bundle described by ``manifest``."""
        return cls(manifest.num_layers, batch_size, manifest.num_kv_heads, manifest.head_dim,
                   KV_DTYPES[manifest.kv_dtype])

    @property
    def keys(self) -> list[np.ndarray]:
        """Per layer (batch, kv_heads, length, head_dim): views, valid until the cache changes shape."""
        return [k if k.shape[2] == self.length else k[:, :, :self.length] for k in self._keys]

    @keys.setter
    def keys(self, arrays: Sequence[np.ndarray]) -> None:
        self._keys = list(arrays)
        self._disown()

    @property
    def values(self) -> list[np.ndarray]:
        return [v if v.shape[2] == self.length else v[:, :, :self.length] for v in self._values]

    @values.setter
    def values(self, arrays: Sequence[np.ndarray]) -> None:
        self._values = list(arrays)
        self._disown()

    @property
    def length(self) -> int:
        """Positions cached (padding included), the graph's ``past_sequence_length``."""
        return self.mask.shape[1]

    @property
    def capacity(self) -> int:
        """Positions the owned buffers hold room for (``length`` when the cache owns none)."""
        return self._keys[0].shape[2] if self._owned and self._keys else self.length

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def num_layers(self) -> int:
        return len(self._keys)

    def update(self, keys: Sequence[np.ndarray], values: Sequence[np.ndarray], mask: np.ndarray) -> None:
        """Take the graph's ``present.*`` arrays (batch, kv_heads, length + seq, head_dim) and their mask."""
        if len(keys) != self.num_layers or len(values) != self.num_layers:
            raise GenerationError(f"Expected present keys/values for {self.num_layers} layers, got {len(keys)}/{len(values)}.")
        if any(k.shape[2] != mask.shape[1] for k in keys):
            raise GenerationError(f"present.* lengths {[k.shape[2] for k in keys]} do not match the mask's {mask.shape[1]}.")
        self._keys, self._values, self.mask = list(keys), list(values), mask
        self._disown()

    def adopt(self, keys: Sequence[np.ndarray], values: Sequence[np.ndarray], mask: np.ndarray) -> None:
        """Take fresh buffers (batch, kv_heads, capacity, head_dim) whose first ``mask.shape[1]``
        positions are the cache, as owned buffers: a step writes after them in place, with no
        ``reserve`` copy while they have room (``DecodeBatch`` re-packs rows straight into them)."""
        if len(keys) != self.num_layers or len(values) != self.num_layers:
            raise GenerationError(f"Expected keys/values for {self.num_layers} layers, got {len(keys)}/{len(values)}.")
        if any(k.shape[2] < mask.shape[1] or k.shape[0] != mask.shape[0] for k in [*keys, *values]):
            raise GenerationError(f"Buffers {[k.shape for k in keys][:1]} cannot hold a cache of shape {mask.shape}.")
        self._keys, self._values, self.mask = list(keys), list(values), mask
        self._owned, self.binding = True, None

    def place(self, row: int, keys: Sequence[np.ndarray], values: Sequence[np.ndarray], mask: np.ndarray) -> None:
        """Write a single-row cache (keys/values (1, kv_heads, n, head_dim), mask (1, n), n <=
        ``length``) into row ``row`` of the owned buffers, right-aligned: its positions are the
        last n, and the row's earlier content is masked out. The buffers (and their binding) stay:
        a row of a batch is refilled without copying the others (``DecodeBatch``)."""
        n = mask.shape[1]
        if not self._owned or not 0 <= row < self.batch_size or n > self.length:
            raise GenerationError(f"Cannot place {n} positions in row {row} of a cache of shape {self.mask.shape} "
                                  f"(owned buffers: {self._owned}).")
        start = self.length - n
        for i in range(self.num_layers):
            self._keys[i][row, :, start:self.length] = keys[i][0]
            self._values[i][row, :, start:self.length] = values[i][0]
        placed = self.mask.copy()  # the old mask may still be an input of the last run
        placed[row, :start] = 0
        placed[row, start:] = mask[0]
        self.mask = placed

    def _disown(self) -> None:
        """The arrays are no longer buffers this cache may write into (nor bound for that)."""
        self._owned, self.binding = False, None

    def reserve(self, needed: int, capacity: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Own buffers with room for ``needed`` positions; return them (key and value buffers per layer).

        Keeps the current buffers when they are owned and big enough; otherwise allocates
        ``capacity`` (>= ``needed``) positions and copies the cached ones in (the only copy).
        """
        if not (self._owned and self.capacity >= needed):
            if capacity < needed:
                raise GenerationError(f"Cannot reserve {needed} KV positions in a buffer of {capacity}.")
            length = self.length

            def grown(old: np.ndarray) -> np.ndarray:
                buffer = np.zeros((*old.shape[:2], capacity, old.shape[3]), dtype=old.dtype)
                buffer[:, :, :length] = old[:, :, :length]
                return buffer

            self._keys = [grown(k) for k in self._keys]
            self._values = [grown(v) for v in self._values]
            self._owned, self.binding = True, None
        return self._keys, self._values

    def advance(self, mask: np.ndarray) -> None:
        """After an in-place step wrote positions ``length..mask.shape[1]`` into the owned buffers."""
        if not self._owned or mask.shape[1] > self.capacity or mask.shape[0] != self.batch_size:
            raise GenerationError(f"An in-place step to {mask.shape[1]} positions needs owned buffers of that size "
                                  f"(capacity {self.capacity}, owned {self._owned}).")
        self.mask = mask

    def rewind(self, n: int) -> None:
        """Keep only the first ``n`` positions (0 <= n <= length)."""
        if not 0 <= n <= self.length:
            raise GenerationError(f"Cannot rewind the KV cache to {n} tokens: it holds {self.length}.")
        if n == self.length:
            return
        # Copies so ONNX Runtime receives contiguous arrays and the dropped tail can be freed.
        self._keys = [np.ascontiguousarray(k[:, :, :n]) for k in self._keys]
        self._values = [np.ascontiguousarray(v[:, :, :n]) for v in self._values]
        self.mask = np.ascontiguousarray(self.mask[:, :n])
        self._disown()
