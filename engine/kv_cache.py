"""The KV cache: every layer's past keys and values, plus the attention mask that goes with them.

Arrays live in host memory as numpy, in the bundle's ``kv_dtype``::

    keys[layer], values[layer]   (batch, kv_heads, length, head_dim)
    mask                         (batch, length) int64, 1 for a real token, 0 for padding

Each decode step replaces the arrays with the graph's ``present.*`` outputs (ONNX Runtime allocates
them anyway, so appending costs no copy of ours). ``rewind(n)`` keeps the first ``n`` positions:
that is how a persona's prefix is computed once and reused every turn. Not thread-safe: one cache
per generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .bundle import Manifest
from .errors import GenerationError

KV_DTYPES = {"fp32": np.float32, "fp16": np.float16}


class KVCache:
    """Past keys/values of ``num_layers`` layers for ``batch_size`` streams of equal length."""

    def __init__(self, num_layers: int, batch_size: int, kv_heads: int, head_dim: int, dtype: type) -> None:
        empty = np.zeros((batch_size, kv_heads, 0, head_dim), dtype=dtype)  # (batch, kv_heads, 0, head_dim)
        self.keys: list[np.ndarray] = [empty] * num_layers
        self.values: list[np.ndarray] = [empty] * num_layers
        self.mask = np.zeros((batch_size, 0), dtype=np.int64)  # (batch, length)

    @classmethod
    def for_manifest(cls, manifest: Manifest, batch_size: int = 1) -> KVCache:
        """An empty cache shaped for the bundle described by ``manifest``."""
        return cls(manifest.num_layers, batch_size, manifest.num_kv_heads, manifest.head_dim,
                   KV_DTYPES[manifest.kv_dtype])

    @property
    def length(self) -> int:
        """Positions cached (padding included), the graph's ``past_sequence_length``."""
        return self.mask.shape[1]

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def update(self, keys: Sequence[np.ndarray], values: Sequence[np.ndarray], mask: np.ndarray) -> None:
        """Take the graph's ``present.*`` arrays (batch, kv_heads, length + seq, head_dim) and their mask."""
        if len(keys) != self.num_layers or len(values) != self.num_layers:
            raise GenerationError(f"Expected present keys/values for {self.num_layers} layers, got {len(keys)}/{len(values)}.")
        if any(k.shape[2] != mask.shape[1] for k in keys):
            raise GenerationError(f"present.* lengths {[k.shape[2] for k in keys]} do not match the mask's {mask.shape[1]}.")
        self.keys, self.values, self.mask = list(keys), list(values), mask

    def rewind(self, n: int) -> None:
        """Keep only the first ``n`` positions (0 <= n <= length)."""
        if not 0 <= n <= self.length:
            raise GenerationError(f"Cannot rewind the KV cache to {n} tokens: it holds {self.length}.")
        if n == self.length:
            return
        # Copies so ONNX Runtime receives contiguous arrays and the dropped tail can be freed.
        self.keys = [np.ascontiguousarray(k[:, :, :n]) for k in self.keys]
        self.values = [np.ascontiguousarray(v[:, :, :n]) for v in self.values]
        self.mask = np.ascontiguousarray(self.mask[:, :n])
