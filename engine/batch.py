"""The decode batch: many streams' KV caches held as one left-padded cache, one forward per step.

Streams of different lengths share one ``KVCache``::

    keys[layer], values[layer]   (rows, kv_heads, length, head_dim)   row r's real positions at the right
    mask                         (rows, length)                       0 on each row's left padding

``Model.forward`` feeds the mask and computes position ids from it (position = real tokens before),
so a padded row gives the same logits as that stream alone. The batch is re-packed only when rows
join or leave: one copy of the KV then, into buffers with the model's room to grow
(``Model.kv_room``) when it extends caches in place (``Model.inplace_kv``), so the next steps write
into them without a second copy to grow. Otherwise a step copies nothing of ours: ONNX Runtime returns the grown
``present.*`` arrays and the cache simply takes them. After every re-pack the
padding every row shares is trimmed, so ``length`` is the longest row's real length and never
exceeds the model's context while every row fits.

A graph without ``attention_mask``/``position_ids`` inputs cannot mask padding; the scheduler then
keeps one single-row batch per stream (``supports_padding``). Not thread-safe: the engine loop owns it.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Generic, TypeVar

import numpy as np

from .generator import LanguageModel
from .kv_cache import KVCache
from .topk import Bonus, TopTokens, host_topk

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
        # Every cache left-padded to the common length and stacked along the batch axis: one copy,
        # into buffers the next steps extend in place when the model does (no second copy to grow).
        total = len(self.rows) + len(joiners)
        keys, values = self._buffers(total, length), self._buffers(total, length)
        row = 0
        for c in caches:
            rows = c.batch_size
            for i in range(self.cache.num_layers):
                keys[i][row:row + rows, :, length - c.length:length] = c.keys[i]
                values[i][row:row + rows, :, length - c.length:length] = c.values[i]
            row += rows
        mask = np.concatenate([_pad_left_mask(c.mask, length) for c in caches], axis=0)  # (rows, length)
        self._set(keys, values, mask)
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
        length = mask.shape[1] - start
        # New buffers, so the dropped rows' memory is released; the kept rows copied once.
        keys, values = self._buffers(len(keep), length), self._buffers(len(keep), length)
        old_keys, old_values = self.cache.keys, self.cache.values
        for i in range(self.cache.num_layers):
            for j, r in enumerate(keep):
                keys[i][j, :, :length] = old_keys[i][r, :, start:]
                values[i][j, :, :length] = old_values[i][r, :, start:]
        self._set(keys, values, np.ascontiguousarray(mask[:, start:]))

    def _buffers(self, rows: int, length: int) -> list[np.ndarray]:
        """Zeroed per-layer buffers (rows, kv_heads, capacity, head_dim) for a cache of ``length``
        positions: with the model's room to grow (``Model.kv_room``) when it extends caches in place
        (``Model.inplace_kv``), else exactly ``length`` (contiguous arrays of the cache's size)."""
        shape = self.cache.keys[0].shape if self.cache.num_layers else (0, 0, 0, 0)
        capacity = length
        if getattr(self.model, "inplace_kv", False):
            capacity = max(length, min(self.model.manifest.max_context, length + self.model.kv_room(rows)))
        return [np.zeros((rows, shape[1], capacity, shape[3]), dtype=self.cache.keys[0].dtype)
                for _ in range(self.cache.num_layers)]

    def _set(self, keys: list[np.ndarray], values: list[np.ndarray], mask: np.ndarray) -> None:
        if keys and keys[0].shape[2] > mask.shape[1]:
            self.cache.adopt(keys, values, mask)
        else:
            self.cache.update(keys, values, mask)

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """Feed one token per row (row order); return next-token logits (rows, vocab)."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(len(self.rows), 1)  # (rows, 1)
        return self.model.forward(ids, self.cache)

    def forward_top(self, token_ids: Sequence[int], k: int,
                    bonuses: Sequence[Mapping[int, float]] = ()) -> TopTokens:
        """``forward``, then each row's ``k`` best logits (``topk.TopTokens``; ``row`` slices the raw
        logits); ``bonuses``: per row, token → logits added before the top k are taken."""
        logits = self.forward(token_ids)  # (rows, vocab), on the host already
        bonus = Bonus.of(bonuses, logits.shape[0])
        ids, values = host_topk(k).of_array(logits, bonus)
        return TopTokens(ids, values, lambda index: logits[index:index + 1], bonused=bonus is not None)


def _pad_left_mask(mask: np.ndarray, length: int) -> np.ndarray:
    missing = length - mask.shape[1]
    return mask if missing == 0 else np.pad(mask, ((0, 0), (missing, 0)))
