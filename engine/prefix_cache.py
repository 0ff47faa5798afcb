"""The server's persona-prefix KV cache: each NPC's persona is prefilled once, then shared by every turn.

Entries are keyed by (NPC id, prefix token ids), so a persona that says ``{{user}}`` gets one entry
per player name, and a changed persona can never be served a stale entry even before
``invalidate(npc)`` (which ``npc.upsert`` calls to free the memory at once).

Sharing is free because a ``KVCache``'s arrays are never written in place: a forward step
*replaces* them with ONNX Runtime's ``present.*`` outputs and a rewind slices into new arrays. So
``get`` hands out a new single-row ``KVCache`` object that points at the stored arrays, and the
request's prefill of its turn-specific tokens leaves the stored snapshot untouched::

    keys[layer], values[layer]   (1, kv_heads, prefix_len, head_dim)
    mask                         (1, prefix_len)

The slot decoder (``slot_model.SlotModel``) cannot share a KV slot, so it brings its own
``Snapshots``: a snapshot is a copy of the slot's prefix positions on the device, and each hit
copies it into the request's new slot (``slot_copy.py``). A snapshot of the slot decoder may also be
taken from a slot that holds more than the prefix (its first ``n`` positions), which is how a
prompt read whole in a group (``prefill.read_together``) leaves its persona prefix behind.

Bounded in bytes (keys + values + mask), least recently used first out; an entry larger than the
whole budget is not stored. ``max_bytes == 0`` turns the cache off. Not thread-safe: the engine
loop owns it.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .errors import ConfigError
from .kv_cache import KVCache

log = logging.getLogger(__name__)

Key = tuple[str, tuple[int, ...]]


def cache_bytes(cache: KVCache) -> int:
    """Host memory held by ``cache``'s arrays, in bytes."""
    return sum(a.nbytes for a in (*cache.keys, *cache.values)) + cache.mask.nbytes


def share(cache: KVCache) -> KVCache:
    """A new ``KVCache`` object over the same arrays; it does not own them, so it never writes into
    them (its first in-place step copies into buffers of its own)."""
    clone = copy.copy(cache)
    clone.keys, clone.values = list(cache.keys), list(cache.values)
    return clone


def compact(cache: KVCache) -> KVCache:
    """A snapshot holding exactly ``cache``'s positions: views into a bigger (in-place) buffer are
    copied out, so the LRU's byte count is what it keeps alive; whole arrays are shared as they are."""
    clone = copy.copy(cache)
    clone.keys = [np.ascontiguousarray(k) for k in cache.keys]
    clone.values = [np.ascontiguousarray(v) for v in cache.values]
    return clone


@runtime_checkable
class Snapshots(Protocol):
    """How a model's caches are kept and resumed: ``snapshot(cache, n)`` keeps the first ``n``
    positions of a one-row cache, ``resume`` gives a new cache holding a snapshot (writing it never
    changes the snapshot), ``snapshot_bytes`` is what a snapshot holds in memory."""

    def snapshot(self, cache: Any, n: int) -> Any: ...

    def resume(self, snapshot: Any) -> Any: ...

    def snapshot_bytes(self, snapshot: Any) -> int: ...


class KVSnapshots:
    """``Snapshots`` of ``KVCache`` (``Model``): a compact copy, shared by every cache resumed from it."""

    @staticmethod
    def snapshot(cache: KVCache, n: int) -> KVCache:
        if n != cache.length:
            raise ConfigError(f"A KVCache snapshot holds the whole cache ({cache.length} positions), not {n}.")
        return compact(cache)

    @staticmethod
    def resume(snapshot: KVCache) -> KVCache:
        return share(snapshot)

    @staticmethod
    def snapshot_bytes(snapshot: KVCache) -> int:
        return cache_bytes(snapshot)


class PrefixCache:
    """LRU of single-row KV snapshots of persona prefixes, at most ``max_bytes`` in all.
    ``snapshots``: the model's (a ``SlotModel``), else ``KVSnapshots`` for ``KVCache``."""

    def __init__(self, max_bytes: int, snapshots: Snapshots | None = None) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ConfigError(f"The prefix cache size must be a byte count >= 0, got {max_bytes!r}.")
        self.max_bytes = max_bytes
        self.snapshots: Snapshots = snapshots if snapshots is not None else KVSnapshots()
        self._entries: OrderedDict[Key, tuple[Any, int]] = OrderedDict()  # key → (snapshot, bytes)
        self.bytes = 0
        self.counters = {"hits": 0, "misses": 0, "evictions": 0, "invalidations": 0}

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    @staticmethod
    def key(npc: str, prefix_ids: Sequence[int]) -> Key:
        return npc, tuple(int(t) for t in prefix_ids)

    def get(self, key: Key) -> Any:
        """A new cache holding the prefix's KV (``Snapshots.resume``), or None; counts a hit or a miss.
        A snapshot that cannot be resumed (device memory, say) is dropped and counts as a miss."""
        entry = self._entries.get(key)
        if entry is None:
            self.counters["misses"] += 1
            return None
        try:
            cache = self.snapshots.resume(entry[0])
        except Exception:  # the cache only saves work: the prompt is read whole instead
            log.warning("Resuming NPC %r's persona prefix failed; dropping it and reading the prompt whole.",
                        key[0], exc_info=True)
            self._drop(key)
            self.counters["misses"] += 1
            return None
        self._entries.move_to_end(key)
        self.counters["hits"] += 1
        return cache

    def put(self, key: Key, cache: Any) -> bool:
        """Keep a snapshot of ``cache``'s first ``len(key[1])`` positions (one row; a ``KVCache`` must
        hold exactly the prefix); False when it cannot fit or the snapshot fails (logged: the request
        goes on without it)."""
        if cache.batch_size != 1 or cache.length < len(key[1]):
            raise ConfigError(f"A prefix snapshot must be one row of {len(key[1])} positions, got "
                              f"{cache.batch_size} row(s) of {cache.length}.")
        if not self.enabled:
            return False
        try:
            snapshot = self.snapshots.snapshot(cache, len(key[1]))
        except ConfigError:  # a misuse (a KVCache longer than its prefix), not a device failure
            raise
        except Exception:  # the request goes on; the next turn reads the prefix again
            log.warning("Keeping NPC %r's persona prefix failed; not cached.", key[0], exc_info=True)
            return False
        size = self.snapshots.snapshot_bytes(snapshot)
        if size > self.max_bytes:
            log.info("A %d-byte persona prefix of NPC %r exceeds the whole prefix cache (%d bytes); not cached.",
                     size, key[0], self.max_bytes)
            return False
        self._drop(key)
        while self._entries and self.bytes + size > self.max_bytes:
            _, (_, old_size) = self._entries.popitem(last=False)
            self.bytes -= old_size
            self.counters["evictions"] += 1
        self._entries[key] = (snapshot, size)
        self.bytes += size
        return True

    def invalidate(self, npc: str) -> int:
        """Drop every entry of ``npc`` (its persona changed); returns how many."""
        gone = [key for key in self._entries if key[0] == npc]
        for key in gone:
            self._drop(key)
        self.counters["invalidations"] += len(gone)
        return len(gone)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def _drop(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes, **self.counters}
