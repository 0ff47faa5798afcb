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
    """Rows (any hashable handle, e.g. requests) decoded together, in a fixed row order.

    ``rows`` are the live rows; each has a physical row of the cache. A row that leaves frees its
    physical row, and a joiner no longer than the batch is written into a free one (``KVCache.place``):
    one row copied, not the batch. Free rows still run in each step (their output is dropped), so
    the batch is re-packed when more than ``1 / FREE_SHARE`` of it is free, or when the left padding
    every live row shares (refilled rows sit right-aligned in a long batch) passes ``PADDING``
    positions and a quarter of the length."""

    FREE_SHARE = 8
    PADDING = 64

    def __init__(self, model: LanguageModel) -> None:
        self.model = model
        self.rows: list[Row] = []
        self.cache: KVCache = model.new_cache(batch_size=0)
        self._phys: list[int] = []  # the cache row of each of ``rows``
        self._free: list[int] = []  # cache rows no live row uses
        self.repacks = 0  # how many times the whole batch was copied (joins, leaves, trims)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, joiners: Sequence[tuple[Row, KVCache]]) -> None:
        """Append rows, each with its own unpadded single-row cache (1, kv_heads, n, head_dim)."""
        rest = []
        for row, cache in joiners:
            if self._free and cache.length <= self.cache.length and self.cache.capacity > self.cache.length:
                phys = self._free.pop()
                self.cache.place(phys, cache.keys, cache.values, cache.mask)
                self.rows.append(row)
                self._phys.append(phys)
            else:
                rest.append((row, cache))
        if rest or (joiners and self._wasteful()):
            self._repack(rest)

    def remove(self, gone: set[Row]) -> None:
        """Drop rows: their cache rows become free (re-packed when too many are, or nothing is left)."""
        keep = [i for i, row in enumerate(self.rows) if row not in gone]
        if len(keep) == len(self.rows):
            return
        self._free += [phys for row, phys in zip(self.rows, self._phys) if row in gone]
        self.rows = [self.rows[i] for i in keep]
        self._phys = [self._phys[i] for i in keep]
        if not self.rows or self._wasteful():
            self._repack([])

    def _wasteful(self) -> bool:
        """Too many free rows, or too much left padding shared by every live row."""
        total = len(self.rows) + len(self._free)
        if self._free and len(self._free) * self.FREE_SHARE > total:
            return True
        return self._shared_padding() > max(self.PADDING, self.cache.length // 4)

    def _shared_padding(self) -> int:
        real = np.flatnonzero(self.cache.mask[self._phys].any(axis=0)) if self._phys else np.empty(0)
        return int(real[0]) if real.size else self.cache.length

    def _repack(self, joiners: Sequence[tuple[Row, KVCache]]) -> None:
        """The live rows (in order, without the padding they all share) and ``joiners``, left-padded to
        one length and copied once into new buffers: with the model's room to grow when it extends
        caches in place (no second copy to grow), and without the free rows' memory."""
        start = self._shared_padding()
        live = self.cache.length - start
        length = max([live, *(cache.length for _, cache in joiners)])
        total = len(self.rows) + len(joiners)
        keys, values = self._buffers(total, length), self._buffers(total, length)
        old_keys, old_values = self.cache.keys, self.cache.values
        phys = np.asarray(self._phys, dtype=np.int64)
        n = len(self._phys)
        for i in range(self.cache.num_layers):
            keys[i][:n, :, length - live:length] = old_keys[i][phys, :, start:]
            values[i][:n, :, length - live:length] = old_values[i][phys, :, start:]
        masks = [_pad_left_mask(self.cache.mask[phys, start:], length)]
        for j, (_, cache) in enumerate(joiners):
            for i in range(self.cache.num_layers):
                keys[i][n + j, :, length - cache.length:length] = cache.keys[i][0]
                values[i][n + j, :, length - cache.length:length] = cache.values[i][0]
            masks.append(_pad_left_mask(cache.mask, length))
        self._set(keys, values, np.ascontiguousarray(np.concatenate(masks, axis=0)))  # mask (rows, length)
        self.rows += [row for row, _ in joiners]
        self._phys, self._free = list(range(total)), []
        self.repacks += 1

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
        if len(token_ids) != len(self.rows):
            raise ValueError(f"forward takes one token per row ({len(self.rows)}), got {len(token_ids)}.")
        if self._phys == list(range(self.cache.batch_size)):  # every cache row live, in row order
            ids = np.asarray(token_ids, dtype=np.int64).reshape(len(self.rows), 1)  # (rows, 1)
            return self.model.forward(ids, self.cache)
        ids = np.zeros((self.cache.batch_size, 1), dtype=np.int64)  # free rows run a token 0, unread
        ids[self._phys, 0] = token_ids
        return self.model.forward(ids, self.cache)[self._phys]  # (rows, vocab)

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
