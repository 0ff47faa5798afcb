"""Persona-prefix KV cache: LRU in bytes, shared snapshots never change, and the server's scheduler
gives exactly the no-cache output while prefilling only the turn's new tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from server_process import LONG_STREAMS, ServerProcess

from npctalk.client import Client

from npctalk.engine.dialogue import Turn
from npctalk.engine.errors import ConfigError
from npctalk.engine.kv_cache import KVCache
from npctalk.engine.model import Model
from npctalk.engine.npcs import PromptBuilder
from npctalk.engine.persona import BUILTIN_DIR, Persona, find_persona
from npctalk.engine.prefix_cache import PrefixCache, cache_bytes
from npctalk.engine.request import Request, RequestKey
from npctalk.engine.sampling import SearchOptions
from npctalk.engine.scheduler import Scheduler, SchedulerConfig

GREEDY = SearchOptions(max_new_tokens=12)


def _snapshot(length: int, fill: float = 1.0) -> KVCache:
    cache = KVCache(2, 1, 1, 4, np.float32)
    kv = [np.full((1, 1, length, 4), fill, dtype=np.float32) for _ in range(2)]
    cache.update(kv, kv, np.ones((1, length), dtype=np.int64))
    return cache


def test_lru_is_bounded_in_bytes_and_invalidation_is_per_npc() -> None:
    one = cache_bytes(_snapshot(10))
    cache = PrefixCache(max_bytes=2 * one)
    a, b, c = (PrefixCache.key(npc, range(10)) for npc in ("a", "b", "c"))
    assert cache.put(a, _snapshot(10)) and cache.put(b, _snapshot(10))
    assert cache.get(a) is not None  # a is now the most recently used
    assert cache.put(c, _snapshot(10))
    assert b not in cache and a in cache and c in cache, "the least recently used entry went first"
    assert cache.bytes == 2 * one and cache.counters["evictions"] == 1
    assert not cache.put(PrefixCache.key("big", range(30)), _snapshot(30)), "an entry above the budget is refused"
    assert cache.invalidate("a") == 1 and a not in cache and cache.bytes == one
    assert cache.get(a) is None and cache.counters["misses"] == 1
    with pytest.raises(ConfigError, match="one row of 10"):
        cache.put(PrefixCache.key("x", range(10)), _snapshot(9))
    with pytest.raises(ConfigError, match="holds the whole cache"):  # a KVCache snapshot is all of it
        cache.put(PrefixCache.key("x", range(10)), _snapshot(11))
    with pytest.raises(ConfigError, match="byte count"):
        PrefixCache(-1)
    off = PrefixCache(0)
    assert not off.enabled and not off.put(a, _snapshot(10)) and len(off) == 0


def test_a_shared_snapshot_survives_the_turns_that_start_from_it(model: Model) -> None:
    prefix = model.tokenizer.encode("Bram is the blacksmith of Ashford.")
    cache = model.new_cache(1)
    model.forward(np.asarray([prefix]), cache)
    store = PrefixCache(1 << 30)
    key = PrefixCache.key("bram", prefix)
    store.put(key, cache)
    saved = [k.copy() for k in cache.keys]
    for line in ("Hello there, smith.", "Any iron today?"):
        turn = store.get(key)
        assert turn is not None and turn.length == len(prefix)
        model.forward(np.asarray([model.tokenizer.encode(line)]), turn)
        assert turn.length > len(prefix)
    again = store.get(key)
    assert again is not None and all(np.array_equal(k, s) for k, s in zip(again.keys, saved))


class RecordingModel:
    """Forwards to a real model and records every call's (batch, seq) shape."""

    def __init__(self, inner: Model) -> None:
        self.inner, self.manifest, self.tokenizer, self.io = inner, inner.manifest, inner.tokenizer, inner.io
        self.shapes: list[tuple[int, int]] = []

    def new_cache(self, batch_size: int = 1) -> KVCache:
        return self.inner.new_cache(batch_size)

    def forward(self, input_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        self.shapes.append(tuple(np.asarray(input_ids).shape))  # type: ignore[arg-type]
        return self.inner.forward(input_ids, cache)


def _say(model: object, rid: str, prompt: list[int], options: SearchOptions = GREEDY) -> Request:
    m = model.manifest  # type: ignore[attr-defined]
    return Request(RequestKey(b"c", rid), prompt, options, model.tokenizer,  # type: ignore[attr-defined]
                   frozenset(m.eos_token_ids), m.max_context, received_at=0.0)


def _run(scheduler: Scheduler, requests: list[tuple[Request, tuple[str, int] | None]]) -> None:
    for request, prefix in requests:
        assert scheduler.submit(request, prefix)
    for _ in range(1000):
        if not scheduler.has_work:
            return
        scheduler.step()
    raise AssertionError("the scheduler did not finish")


def _prompts(model: Model, persona: Persona) -> tuple[PromptBuilder, list[int], list[list[int]]]:
    builder = PromptBuilder(model.manifest, model.tokenizer)
    history = [Turn("user", "Good morning."), Turn("assistant", "Morning, friend.")]
    lines = [("Got any iron?", [], {}), ("Who trained Captain Reyna?", history, {"location": "the forge"}),
             ("Tell me about Hilde.", history * 2, {"time_of_day": "dusk"})]
    prompts = [builder.build(persona, h, line, ctx, GREEDY.max_new_tokens, player="Mira") for line, h, ctx in lines]
    return builder, builder.persona_prefix(persona, "Mira"), prompts


@pytest.mark.parametrize("batched", [True, False])
def test_cached_prefix_gives_the_no_cache_output_and_prefills_only_new_tokens(model: Model, batched: bool) -> None:
    persona = find_persona("bram")
    _, prefix, prompts = _prompts(model, persona)
    assert all(p[:len(prefix)] == prefix for p in prompts), "every prompt opens with the persona prefix"

    plain = Scheduler(model, SchedulerConfig(prefix_cache_bytes=0))
    plain.batched = batched
    expected = [_say(model, str(i), p) for i, p in enumerate(prompts)]
    for request in expected:  # one at a time: the reference is each prompt alone
        _run(plain, [(request, None)])

    recording = RecordingModel(model)
    cached = Scheduler(recording, SchedulerConfig(prefill_chunk=0))  # type: ignore[arg-type]  # whole-prompt shapes
    cached.batched = batched
    got = [_say(recording, str(i), p) for i, p in enumerate(prompts)]
    _run(cached, [(got[0], ("bram", len(prefix)))])  # cold: the prefix is prefilled alone and stored
    assert recording.shapes[:2] == [(1, len(prefix)), (1, len(prompts[0]) - len(prefix))]
    recording.shapes.clear()
    _run(cached, [(r, ("bram", len(prefix))) for r in got[1:]])  # warm, two streams batched together
    prefills = [s for s in recording.shapes if s[1] > 1]
    assert sorted(prefills) == sorted((1, len(p) - len(prefix)) for p in prompts[1:]), "only the new tokens prefilled"
    stats = cached.stats()["prefix_cache"]
    assert (stats["hits"], stats["misses"], stats["entries"]) == (2, 1, 1)
    for want, have in zip(expected, got):
        assert (have.text, have.finish_reason, have.tokens) == (want.text, want.finish_reason, want.tokens)


def test_cached_streams_batch_with_other_streams_and_keep_their_output(model: Model) -> None:
    """Cached-prefix requests decode in one batch with unrelated prompts and sampled options."""
    persona = find_persona("elda")
    _, prefix, prompts = _prompts(model, persona)
    other = model.tokenizer.encode("A wandering bard sings of dragons")
    sampled = SearchOptions(max_new_tokens=16, do_sample=True, temperature=0.9, top_k=30, seed=11)
    plain = Scheduler(model, SchedulerConfig(prefix_cache_bytes=0))
    reference = [_say(model, "p0", prompts[0]), _say(model, "p1", prompts[1], sampled), _say(model, "o", other)]
    _run(plain, [(r, None) for r in reference])
    cached = Scheduler(model, SchedulerConfig())
    warm = _say(model, "warm", prompts[2])
    _run(cached, [(warm, ("elda", len(prefix)))])
    got = [_say(model, "p0", prompts[0]), _say(model, "p1", prompts[1], sampled), _say(model, "o", other)]
    _run(cached, [(got[0], ("elda", len(prefix))), (got[1], ("elda", len(prefix))), (got[2], None)])
    assert cached.stats()["prefix_cache"]["hits"] == 2
    for want, have in zip(reference, got):
        assert (have.text, have.tokens) == (want.text, want.tokens)


def test_a_prefix_hint_that_is_not_a_real_prefix_is_ignored(model: Model) -> None:
    prompt = model.tokenizer.encode("Hello")
    scheduler = Scheduler(model, SchedulerConfig())
    request = _say(model, "r", prompt)
    _run(scheduler, [(request, ("bram", len(prompt)))])  # the whole prompt: nothing would be left to prefill
    assert request.finish_reason is not None and len(scheduler.prefix_cache) == 0


def test_the_server_reuses_the_prefix_and_npc_upsert_invalidates_it(gpt2_bundle: Path, tmp_path: Path) -> None:
    """Through the real server: second say to an NPC hits, an upsert that changes it drops its entries,
    and a Character Card upserted as a persona map talks."""
    server = ServerProcess(gpt2_bundle, tmp_path, *LONG_STREAMS, "--memory-db", ":memory:").start()
    try:
        with Client(server.endpoint) as client:
            first = client.say("bram", "Hello", max_new_tokens=4).wait()
            second = client.say("bram", "Hello again", max_new_tokens=4).wait()
            assert first.text and second.text
            stats = client.stats()["prefix_cache"]
            assert (stats["misses"], stats["hits"], stats["entries"]) == (1, 1, 1) and stats["bytes"] > 0
            client.upsert_npc("bram", {**client.get_npc("bram"), "role": "a retired blacksmith"})
            stats = client.stats()["prefix_cache"]
            assert (stats["entries"], stats["invalidations"], stats["bytes"]) == (0, 1, 0)
            card = json.loads((BUILTIN_DIR / "wren.json").read_text(encoding="utf-8"))
            assert card["data"]["character_book"]["entries"]  # a lorebook: 7 levels deep on the wire
            assert client.upsert_npc("ferry", card)
            assert client.get_npc("ferry")["name"] == "Wren"
            assert client.say("ferry", "Two coppers?", player="Mira", max_new_tokens=4).wait().text
    finally:
        server.stop()
