"""Chunked prefill: a joining request's prompt enters its own KV cache a bounded piece at a time.

The scheduler gives each engine step a prompt-token budget (``SchedulerConfig.prefill_chunk``), so a
long prompt is spread over several steps and the streams already decoding get a token between its
pieces instead of stalling for the whole prompt. A prompt of P tokens whose first n are an NPC's
persona prefix runs as::

    hit    cache = the prefix cache's snapshot (1, kv_heads, n, head_dim); prompt[n:] in pieces
    miss   prompt[:n] in pieces → snapshot stored in the prefix cache → prompt[n:] in pieces
    none   prompt in pieces
    group  (the slot decoder, ``read_together``) whole prompts of new requests in one call; a
           prefix to store is then snapshotted from its slot's first n positions

Each piece is one ``forward`` of a single row: (1, k) ids after a (1, kv_heads, done, head_dim) past,
and the cache grows by k. One row with a past may carry several new tokens in every graph the engine
runs (the lean graph's GroupQueryAttention refuses that only for batch > 1). Attention is causal, so
where the prompt is cut changes nothing but float rounding; only the last piece's logits are used
(the first reply token is sampled from them). A piece never crosses the end of a prefix that is
still to be stored, so the snapshot holds exactly the prefix, as the prefix cache requires.

Not thread-safe: the engine loop owns every ``Prefill``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from .generator import LanguageModel
from .kv_cache import KVCache
from .prefix_cache import Key, PrefixCache
from .request import Request

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Prefill:
    """One request's prompt on its way into ``cache``; ``prefix``: a persona prefix to store once
    the cache holds exactly its ids (None: nothing to store)."""

    request: Request
    cache: KVCache  # (1, kv_heads, done, head_dim)
    prefix: Key | None = None

    @classmethod
    def start(cls, request: Request, model: LanguageModel, prefix_cache: PrefixCache, key: Key | None) -> Prefill:
        """Begin ``request``'s prefill from the persona prefix ``key``'s snapshot when the prefix cache
        holds it, else from an empty cache (storing the prefix on the way when ``key`` is given)."""
        if key is None:
            return cls(request, model.new_cache(batch_size=1))
        cache = prefix_cache.get(key)
        if cache is not None:
            return cls(request, cache)
        return cls(request, model.new_cache(batch_size=1), key)

    @property
    def done(self) -> int:
        """Prompt tokens already in the cache."""
        return self.cache.length

    @property
    def remaining(self) -> int:
        return self.request.prompt_tokens - self.done

    def advance(self, model: LanguageModel, budget: int, prefix_cache: PrefixCache) -> tuple[np.ndarray | None, int]:
        """Run at most ``budget`` (>= 1) more prompt tokens through ``model``.

        Returns (the last prompt position's logits (1, vocab) once the whole prompt is in, else None;
        the prompt tokens run). Model errors propagate: the caller fails the request.
        """
        ran, logits = 0, None
        while ran < budget and self.remaining:
            end = min(self.request.prompt_tokens, self.done + budget - ran)
            if self.prefix is not None:
                end = min(end, len(self.prefix[1]))  # the snapshot must hold the prefix and nothing more
            ids = np.asarray([self.request.prompt_ids[self.done:end]], dtype=np.int64)  # (1, end - done)
            ran += end - self.done
            logits = model.forward(ids, self.cache)  # (1, vocab); cache (1, kv_heads, end, head_dim)
            if self.prefix is not None and self.done == len(self.prefix[1]):
                prefix_cache.put(self.prefix, self.cache)  # a snapshot: later pieces replace, never mutate, arrays
                self.prefix = None
        return (logits if not self.remaining else None), ran


def group_together(queue: Iterable[Request], budget: int, room: int, cached: Callable[[Request], bool]) -> list[Request]:
    """The queue's first requests whose whole prompts fit ``budget`` tokens together (at most
    ``room``), for a model that reads several new prompts in one call (``forward_many``). Arrival
    order is kept: the group ends at the first request that does not fit, whose persona prefix is
    ``cached`` (it starts from the snapshot and reads only its turn), or that is too large for its
    cache (that one then fails alone, not with its group)."""
    group: list[Request] = []
    cost = 0
    for request in queue:
        if (len(group) == room or cached(request) or cost + request.prompt_tokens > budget
                or request.prompt_tokens >= request.max_context):
            break
        group.append(request)
        cost += request.prompt_tokens
    return group


def read_together(model: LanguageModel, prefills: list[Prefill], prefix_cache: PrefixCache) -> np.ndarray:
    """Each new prefill's whole prompt in one ``forward_many`` call: the last position's logits
    (len(prefills), vocab), in order. A persona prefix to store is then snapshotted from the first
    positions of its prompt (once per prefix). Model errors propagate: the caller fails the group."""
    logits = model.forward_many([(np.asarray([p.request.prompt_ids], dtype=np.int64), p.cache)  # type: ignore[attr-defined]
                                 for p in prefills])
    for prefill in prefills:
        if prefill.prefix is not None and prefill.prefix not in prefix_cache:
            prefix_cache.put(prefill.prefix, prefill.cache)  # the slot's first positions: the prefix
        prefill.prefix = None
    return logits
