"""The decode batch: many streams' KV caches held as one left-padded cache, one forward per step.

Streams of different lengths share one ``KVCache``::

    keys[layer], values[layer]   (rows, kv_heads, length, head_dim)   row r's real positions at the right
    mask                         (rows, length)                       0 on each row's left padding

``Model.forward`` feeds the mask and computes position ids from it (position = real tokens before),
so a padded row gives the same logits as that stream alone. The batch is re-packed only when rows
join or leave (one copy of the KV then); a plain step copies nothing of ours, because ONNX Runtime
returns the grown ``present.*`` arrays and the cache simply takes them. After every re-pack the
padding every row shares is trimmed, so ``length`` is the longest row's real length and never
exceeds the model's context while every row fits.

A graph without ``attention_mask``/``position_ids`` inputs cannot mask padding; the scheduler then
keeps one single-row batch per stream (``supports_padding``). Not thread-safe: the engine loop owns it.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

import numpy as np

from .generator import LanguageModel
from .kv_cache import KVCache
from .topk import TopTokens, host_topk

log = logging.getLogger(__name__)

Row = TypeVar("Row", bound=Hashable)


def supports_padding(model: LanguageModel) -> bool:
    """True when the graph takes an attention mask and position ids, so padded rows are exact.

    Models without a ``GraphIO`` (the tests' scripted models) compute from the mask themselves.
    """
    io = getattr(model, "io", None)
    return io is None or (io.attention_mask is not None and io.position_ids is not None)


def new_batch(model: LanguageModel) -> DecodeBatch:
    """The model's own batch when it has one (``SlotModel``: rows keep their device slots), else a
    left-padded ``DecodeBatch``."""
    make = getattr(model, "new_batch", None)
    return make() if make is not None else DecodeBatch(model)


def close_cache(cache: object) -> None:
    """Give back what a cache holds when it has something to give back (a ``SlotCache``'s slot)."""
    close = getattr(cache, "close", None)
    if close is not None:
        close()


class DecodeBatch(Generic[Row]):
    """Rows (any hashable handle, e.g. requests) decoded together, in a fixed row order."""

    def __init__(self, model: LanguageModel) -> None:
        self.model = model
        self.rows: list[Row] = []
        self.cache: KVCache = model.new_cache(batch_size=0)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, joiners: Sequence[tuple[Row, KVCache]]) -> None:
        """Append rows, each with its own unpadded single-row cache (1, kv_heads, n, head_dim)."""
        if not joiners:
            return
        caches = [self.cache, *(cache for _, cache in joiners)]
        length = max(c.length for c in caches)
        # Every cache left-padded to the common length, then stacked along the batch axis (one copy).
        keys = [np.concatenate([_pad_left(c.keys[i], length) for c in caches], axis=0) for i in range(self.cache.num_layers)]
        values = [np.concatenate([_pad_left(c.values[i], length) for c in caches], axis=0) for i in range(self.cache.num_layers)]
        mask = np.concatenate([_pad_left_mask(c.mask, length) for c in caches], axis=0)  # (rows, length)
        self.cache.update(keys, values, mask)
        self.rows += [row for row, _ in joiners]

    def remove(self, gone: set[Row]) -> None:
        """Drop rows, then the left padding every remaining row shares."""
        keep = [i for i, row in enumerate(self.rows) if row not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        mask = self.cache.mask[keep]  # (rows, length)
        real = np.flatnonzero(mask.any(axis=0))
        start = int(real[0]) if real.size else mask.shape[1]
        # Fancy indexing copies, so the dropped rows' memory is released.
        keys = [np.ascontiguousarray(k[keep][:, :, start:]) for k in self.cache.keys]
        values = [np.ascontiguousarray(v[keep][:, :, start:]) for v in self.cache.values]
        self.cache.update(keys, values, np.ascontiguousarray(mask[:, start:]))

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """Feed one token per row (row order); return next-token logits (rows, vocab)."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(len(self.rows), 1)  # (rows, 1)
        return self.model.forward(ids, self.cache)

    def forward_top(self, token_ids: Sequence[int], k: int) -> TopTokens:
        """``forward``, then each row's ``k`` best logits (``topk.TopTokens``; ``row`` slices the logits)."""
        logits = self.forward(token_ids)  # (rows, vocab), on the host already
        ids, values = host_topk(k).of_array(logits)
        return TopTokens(ids, values, lambda index: logits[index:index + 1])


def _pad_left(array: np.ndarray, length: int) -> np.ndarray:
    """(rows, kv_heads, n, head_dim) → (rows, kv_heads, length, head_dim), zeros on the left."""
    missing = length - array.shape[2]
    return array if missing == 0 else np.pad(array, ((0, 0), (0, 0), (missing, 0), (0, 0)))


def _pad_left_mask(mask: np.ndarray, length: int) -> np.ndarray:
    missing = length - mask.shape[1]
    return mask if missing == 0 else np.pad(mask, ((0, 0), (missing, 0)))
