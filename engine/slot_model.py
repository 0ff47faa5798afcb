"""The slot decoder as the server's model: what ``Scheduler``, ``Prefill`` and reranking call.

The scheduler speaks ``LanguageModel`` (``new_cache``, ``forward``) and batches with
``DecodeBatch``. For a slots-layout bundle (``engine/slots.py``) the KV lives in device slots, so:

- ``SlotModel.new_cache()`` reserves a free slot and returns a ``SlotCache`` for it;
  ``forward(ids, cache)`` runs those ids into that slot (a prompt, or a chunk after it) and returns
  the last position's logits (1, vocab). Nothing is copied out of the slot. ``forward_many`` does
  the same for several new streams' whole prompts together (the scheduler's burst of joiners).
- ``SlotModel.new_batch()`` is a ``SlotBatch``: rows joining bring their ``SlotCache`` (already
  filled by their prefill: joining moves nothing) and one ``forward`` decodes every row in a single
  ``SlotDecoder.step`` (a CUDA graph on the GPU). When every row's next token is the plain argmax
  (greedy, no repetition controls or steering bonus), the scheduler calls ``forward_greedy`` and
  only the argmax of each row leaves the device, not the logits; in a mixed batch the logits come
  back for every row, and the plain-greedy rows still take the device's argmax (``last_argmax``).
- A slot returns to the pool when its cache is closed: the batch closes the caches of rows that
  leave, the scheduler those of prefills that end early, and a cache nobody holds any more is
  closed when it is collected.

- Persona prefixes: a slot cannot be shared, so ``SlotModel`` is the prefix cache's ``Snapshots``:
  ``snapshot(cache, n)`` copies the slot's first ``n`` positions out (on the device), ``resume``
  reserves a slot and copies a snapshot in (``slot_copy.py``).

``manifest.max_context`` is the slot capacity, so the server's size checks refuse what a slot
cannot hold. Not done here (yet): sampling (top-k/top-p, penalties) on the device: a step with such
a row copies every slot's logits back.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from .bundle import load_manifest
from .errors import ContextOverflowError, GenerationError, ServeError
from .model import Model, Provider
from .slot_copy import SlotSnapshot
from .slots import SlotDecoder
from .topk import Bonus, TopK, TopTokens

log = logging.getLogger(__name__)

Row = TypeVar("Row", bound=Hashable)


class SlotCache:
    """One stream's KV: a reserved slot of the decoder. ``length`` is what the slot holds."""

    def __init__(self, pool: SlotModel, slot: int) -> None:
        self._pool, self.slot, self.closed = pool, slot, False

    @property
    def length(self) -> int:
        return int(self._pool.decoder.lengths[self.slot])

    @property
    def batch_size(self) -> int:
        return 1

    def rewind(self, n: int) -> None:
        """Keep the first ``n`` tokens (``Generator.rewind_to``)."""
        self._pool.decoder.rewind(self.slot, n)

    def close(self) -> None:
        """Give the slot back (idempotent)."""
        if not self.closed:
            self.closed = True
            self._pool.free(self.slot)

    def __del__(self) -> None:  # a cache dropped without close() still frees its slot
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to free
            pass


class SlotModel:
    """A ``SlotDecoder`` behind the ``LanguageModel`` interface, plus ``new_batch`` for the scheduler."""

    inplace_kv = True  # every KV slot is bound as both past and present: new positions are written in place

    def __init__(self, decoder: SlotDecoder) -> None:
        self.decoder = decoder
        self.manifest = dataclasses.replace(decoder.manifest, max_context=decoder.capacity)
        self.tokenizer = decoder.tokenizer
        self.provider = decoder.device
        self._topk: dict[int, TopK] = {}
        self._free = list(range(decoder.slots))  # a heap: the lowest free slot is taken first, so active
        # slots stay packed at the bottom and a step runs as few rows as possible (``SlotDecoder.step``)

    @classmethod
    def open(cls, bundle: str | Path, slots: int, capacity: int | None = None, *, provider: Provider = "auto",
             intra_op_threads: int | None = None, cuda_graph: bool = True) -> SlotModel:
        return cls(SlotDecoder(bundle, slots, capacity, provider=provider, cuda_graph=cuda_graph,
                               intra_op_threads=intra_op_threads))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def free(self, slot: int) -> None:
        self.decoder.release(slot)
        heapq.heappush(self._free, slot)

    def new_cache(self, batch_size: int = 1) -> SlotCache:
        """Reserve a slot; ``ServeError`` when all are taken (the scheduler admits at most its batch)."""
        if batch_size != 1:
            raise GenerationError("A slot cache holds one stream; batches are SlotBatch rows.")
        if not self._free:
            raise ServeError(f"All {self.decoder.slots} KV slots are in use.")
        return SlotCache(self, heapq.heappop(self._free))  # free slots are empty: ``free`` released them

    def forward(self, input_ids: np.ndarray, cache: SlotCache) -> np.ndarray:  # type: ignore[override]
        """Run (1, n) ids into ``cache``'s slot after what it holds; the last position's logits (1, vocab)."""
        if not isinstance(cache, SlotCache) or cache.closed:
            raise GenerationError("SlotModel.forward needs an open SlotCache from new_cache().")
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise GenerationError(f"input_ids must be (1, seq>=1) for one slot, got shape {ids.shape}.")
        if cache.length + ids.shape[1] > self.decoder.capacity:
            raise ContextOverflowError(f"{ids.shape[1]} new tokens after {cache.length} cached make more than the "
                                       f"slot's {self.decoder.capacity} tokens.")
        self.decoder.prefill(cache.slot, ids[0])
        return self.decoder.logits()  # (1, vocab)

    def forward_many(self, pieces: Sequence[tuple[np.ndarray, SlotCache]]) -> np.ndarray:
        """``forward`` for several new streams at once: each (1, n) ids into its empty cache's slot.

        Returns the last position's logits of each piece, (len(pieces), vocab), in order. Runs of
        consecutive slots share one batch, then one step feeds every last token
        (``SlotDecoder.prefill_many``): a burst of NPCs starting to talk is read in a few runs, not
        one run per prompt.
        """
        slots, prompts = [], []
        for ids, cache in pieces:
            if not isinstance(cache, SlotCache) or cache.closed:
                raise GenerationError("SlotModel.forward_many needs open SlotCaches from new_cache().")
            ids = np.asarray(ids, dtype=np.int64)
            if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
                raise GenerationError(f"input_ids must be (1, seq>=1) for one slot, got shape {ids.shape}.")
            if cache.length:
                raise GenerationError(f"forward_many starts new streams; slot {cache.slot} already holds {cache.length} tokens.")
            slots.append(cache.slot)
            prompts.append(ids[0])
        self.decoder.prefill_many(slots, prompts)
        return self.decoder.logits()[slots]  # (len(pieces), vocab)

    def snapshot(self, cache: SlotCache, n: int) -> SlotSnapshot:
        """The first ``n`` positions of ``cache``'s slot, copied (``prefix_cache.Snapshots``)."""
        if not isinstance(cache, SlotCache) or cache.closed:
            raise GenerationError("SlotModel.snapshot needs an open SlotCache.")
        return self.decoder.snapshot(cache.slot, n)

    def resume(self, snapshot: SlotSnapshot) -> SlotCache:
        """A newly reserved slot holding ``snapshot``: the next ``forward`` runs after it."""
        cache = self.new_cache()
        try:
            self.decoder.restore(cache.slot, snapshot)
        except BaseException:
            cache.close()
            raise
        return cache

    @staticmethod
    def snapshot_bytes(snapshot: SlotSnapshot) -> int:
        return snapshot.nbytes

    def topk(self, k: int) -> TopK:
        """The ``k``-largest session on the decoder's device (made once per ``k``)."""
        if k not in self._topk:
            self._topk[k] = TopK(k, self.decoder.device)
        return self._topk[k]

    def new_batch(self) -> SlotBatch:
        return SlotBatch(self)


class SlotBatch(Generic[Row]):
    """``DecodeBatch``'s interface over slots: rows keep their slot, one step decodes them all."""

    def __init__(self, model: SlotModel) -> None:
        self.model = model
        self.rows: list[Row] = []
        self._caches: list[SlotCache] = []
        self._next = np.zeros(0, dtype=np.int64)  # the last step's argmax per slot

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, joiners: Sequence[tuple[Row, SlotCache]]) -> None:
        """Rows join with the slot their prefill filled; nothing is copied."""
        for row, cache in joiners:
            if not isinstance(cache, SlotCache) or cache.closed:
                raise GenerationError("A SlotBatch row needs the open SlotCache its prefill filled.")
            self.rows.append(row)
            self._caches.append(cache)

    def remove(self, gone: set[Row]) -> None:
        """Rows leave; their slots go back to the pool."""
        keep = [i for i, row in enumerate(self.rows) if row not in gone]
        for i, cache in enumerate(self._caches):
            if i not in keep:
                cache.close()
        self.rows = [self.rows[i] for i in keep]
        self._caches = [self._caches[i] for i in keep]

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """One token per row (row order) → next-token logits (rows, vocab), all rows in one step."""
        slots = self._step(token_ids)
        return self.model.decoder.logits()[slots]  # (rows, vocab)

    def forward_greedy(self, token_ids: Sequence[int]) -> np.ndarray:
        """Like ``forward``, but only each row's argmax token (rows,) comes back from the device: for
        rows whose next token is the plain argmax (``Request.needs_logits`` False)."""
        slots = self._step(token_ids)
        return self._next[slots]

    def forward_top(self, token_ids: Sequence[int], k: int,
                    bonuses: Sequence[Mapping[int, float]] = ()) -> TopTokens:
        """Like ``forward``, but only each row's ``k`` best logits leave the device (``topk.TopTokens``;
        ``row`` copies one row's whole raw logits back, for a row those cannot decide). ``bonuses``:
        per row, token → logits added on the device before the top k are taken."""
        slots = self._step(token_ids)
        decoder = self.model.decoder
        topk, logits, vocab = self.model.topk(k), decoder.logits_value, decoder.manifest.vocab_size
        bonus = Bonus.of(bonuses, int(logits.shape()[0]), slots)
        ids, values = topk.of_value(logits, vocab, bonus)
        return TopTokens(ids[slots], values[slots], lambda index: topk.row_of_value(logits, slots[index], vocab),
                         bonused=bonus is not None)

    def last_argmax(self) -> np.ndarray:
        """Each row's argmax token (rows,) from the last ``forward``/``forward_greedy``."""
        return self._next[[cache.slot for cache in self._caches]]

    def _step(self, token_ids: Sequence[int]) -> list[int]:
        decoder = self.model.decoder
        if len(token_ids) != len(self.rows):
            raise GenerationError(f"forward takes one token per row ({len(self.rows)}), got {len(token_ids)}.")
        tokens = np.zeros(decoder.slots, dtype=np.int64)
        active = np.zeros(decoder.slots, dtype=bool)
        slots = [cache.slot for cache in self._caches]
        tokens[slots], active[slots] = token_ids, True
        self._next = decoder.step(tokens, active)  # (slots,) each slot's argmax
        return slots


DEFAULT_SLOT_CONTEXT = 2048  # tokens per slot unless asked otherwise (the model's context when smaller)


def open_model(bundle: str | Path, *, provider: Provider = "auto", intra_op_threads: int | None = None,
               spin: bool = True, slots: int = 8, slot_context: int | None = None) -> Model | SlotModel:
    """The bundle as the engine runs it: a slots-layout bundle (what ``export-onnx --device cuda``
    writes) on the slot decoder, with ``slots`` KV slots of ``slot_context`` tokens (default: the
    model's context, at most ``DEFAULT_SLOT_CONTEXT``); any other bundle on ``Model``."""
    manifest = load_manifest(bundle)
    if manifest.layout != "slots":
        return Model(bundle, provider=provider, intra_op_threads=intra_op_threads, spin=spin)
    capacity = slot_context or min(manifest.max_context, DEFAULT_SLOT_CONTEXT)
    return SlotModel.open(bundle, slots, capacity, provider=provider, intra_op_threads=intra_op_threads)
