"""Persona prefixes on the slot decoder: snapshots copied into each turn's slot give the replies of
reading the whole prompt, a burst of cold prompts read together leaves its prefixes behind, and the
real server on a slots bundle reuses them."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_process import LONG_STREAMS, ServerProcess
from test_prefix_cache import _prompts, _run, _say
from test_scheduler import check_streams, run

from npctalk.client import Client
from npctalk.engine.model import Model
from npctalk.engine.persona import find_persona
from npctalk.engine.sampling import SearchOptions
from npctalk.engine.scheduler import Scheduler, SchedulerConfig
from npctalk.engine.slot_model import SlotModel

SAMPLED = SearchOptions(max_new_tokens=14, do_sample=True, temperature=0.9, top_k=30, seed=11)


@pytest.fixture(params=["gpt2", "llama"])
def pair(request: pytest.FixtureRequest) -> tuple[Model, SlotModel]:
    """The mask-layout Model and a slot model (4 slots of the model's context) of the same tiny weights."""
    mask = Model(request.getfixturevalue(f"{request.param}_bundle"), provider="cpu", intra_op_threads=1)
    slots = SlotModel.open(request.getfixturevalue(f"{request.param}_slots_bundle"), 4, None, provider="cpu",
                           intra_op_threads=1)
    return mask, slots


def _reference(model: Model, prompts: list[list[int]], options: list[SearchOptions]) -> list[tuple[str, list[int]]]:
    """Each prompt alone, read whole, on the mask-layout model without a prefix cache."""
    plain = Scheduler(model, SchedulerConfig(prefix_cache_bytes=0))
    out = []
    for i, (prompt, option) in enumerate(zip(prompts, options)):
        request = _say(model, str(i), prompt, option)
        _run(plain, [(request, None)])
        out.append((request.text, request.tokens))
    return out


def test_turns_start_from_the_prefix_snapshot_with_the_replies_of_whole_prompts(pair: tuple[Model, SlotModel]) -> None:
    mask, slots = pair
    _, prefix, prompts = _prompts(mask, find_persona("bram"))
    options = [SearchOptions(max_new_tokens=12), SAMPLED, SearchOptions(max_new_tokens=12)]
    want = _reference(mask, prompts, options)
    scheduler = Scheduler(slots, SchedulerConfig(max_batch=3, prefill_chunk=16))  # chunks cross the prefix's end
    hint = ("bram", len(prefix))
    got = [_say(slots, str(i), p, o) for i, (p, o) in enumerate(zip(prompts, options))]
    _run(scheduler, [(got[0], hint)])                  # cold: the prefix is read, snapshotted, then the turn
    _run(scheduler, [(r, hint) for r in got[1:]])      # warm: two turns copy the snapshot into their slots
    stats = scheduler.stats()["prefix_cache"]
    assert (stats["misses"], stats["hits"], stats["entries"]) == (1, 2, 1)
    m = slots.manifest
    assert stats["bytes"] == 2 * m.num_layers * m.num_kv_heads * len(prefix) * m.head_dim * 4
    assert [(r.text, r.tokens) for r in got] == want
    assert slots.free_slots == 4, "every slot came back"


def _two_bursts(pair: tuple[Model, SlotModel], config: SchedulerConfig) -> tuple[Scheduler, list[tuple[int, int]]]:
    """Three requests for two NPCs (bram, elda, bram) arrive at once, twice, on the slot model; every
    reply must be the reply of its whole prompt read alone. Returns the scheduler and, after each
    burst, (prompts read together so far, persona prefixes cached)."""
    mask, slots = pair
    prompts, hints = [], []
    for name in ("bram", "elda", "bram"):
        _, prefix, persona_prompts = _prompts(mask, find_persona(name))
        prompts.append(persona_prompts[len(prompts) % 2])
        hints.append((name, len(prefix)))
    options = [SearchOptions(max_new_tokens=10), SAMPLED, SearchOptions(max_new_tokens=10)]
    want = _reference(mask, prompts, options)
    scheduler = Scheduler(slots, config)
    after = []
    for burst in range(2):
        got = [_say(slots, f"{burst}-{i}", p, o) for i, (p, o) in enumerate(zip(prompts, options))]
        for request, hint in zip(got, hints):
            assert scheduler.submit(request, hint)
        check_streams(run(scheduler), got)
        assert [(r.text, r.tokens) for r in got] == want
        after.append((scheduler.counters["prefilled_together"], scheduler.stats()["prefix_cache"]["entries"]))
    assert slots.free_slots == 4
    return scheduler, after


def test_a_cold_burst_is_read_together_and_leaves_its_prefixes_for_the_next(pair: tuple[Model, SlotModel]) -> None:
    """The cold burst is read in one call, and the two persona prefixes are snapshotted from the
    slots afterwards; the next burst starts from them, each turn read alone."""
    scheduler, after = _two_bursts(pair, SchedulerConfig(max_batch=3, prefill_chunk=4096))
    assert after == [(3, 2), (3, 2)]
    stats = scheduler.stats()["prefix_cache"]
    assert (stats["misses"], stats["hits"]) == (3, 3)


def test_group_cached_reads_a_warm_burst_together_whole(pair: tuple[Model, SlotModel]) -> None:
    """With ``group_cached`` (for a GPU) the warm burst, whose persona prefixes are all cached, is
    read in one call too, whole, instead of one turn at a time from the snapshots: the same replies,
    the snapshots neither used nor stored again."""
    scheduler, after = _two_bursts(pair, SchedulerConfig(max_batch=3, prefill_chunk=4096, group_cached=True))
    assert after == [(3, 2), (6, 2)]
    assert scheduler.stats()["prefix_cache"]["hits"] == 0


def test_the_server_on_a_slots_bundle_reuses_persona_prefixes(gpt2_slots_bundle: Path, tmp_path: Path) -> None:
    server = ServerProcess(gpt2_slots_bundle, tmp_path, *LONG_STREAMS, "--memory-db", ":memory:",
                           "--slot-context", "400").start()
    try:
        with Client(server.endpoint) as client:
            first = client.say("bram", "Hello", max_new_tokens=4).wait()
            second = client.say("bram", "Hello again", max_new_tokens=4).wait()
            assert first.text and second.text and second.usage.prompt_tokens > 0
            stats = client.stats()["prefix_cache"]
            assert (stats["misses"], stats["hits"], stats["entries"]) == (1, 1, 1) and stats["bytes"] > 0
            client.upsert_npc("bram", {**client.get_npc("bram"), "role": "a retired blacksmith"})
            assert client.stats()["prefix_cache"]["entries"] == 0
            assert client.say("bram", "Still smithing?", max_new_tokens=4).wait().text
    finally:
        server.stop()


def test_a_failing_copy_costs_the_cache_not_the_reply(pair: tuple[Model, SlotModel], monkeypatch: pytest.MonkeyPatch) -> None:
    """Device memory runs out, say: a snapshot that cannot be taken is not kept, one that cannot be
    copied in is dropped, and both turns read their whole prompt and give the same reply."""
    mask, slots = pair
    _, prefix, prompts = _prompts(mask, find_persona("tobin"))
    want = _reference(mask, prompts[:2], [SearchOptions(max_new_tokens=8)] * 2)
    scheduler = Scheduler(slots, SchedulerConfig(max_batch=2))
    hint = ("tobin", len(prefix))

    def broken(*args: object) -> None:
        raise RuntimeError("out of device memory")

    with monkeypatch.context() as patch:
        patch.setattr(slots.decoder, "snapshot", broken)
        first = _say(slots, "a", prompts[0], SearchOptions(max_new_tokens=8))
        _run(scheduler, [(first, hint)])
    assert len(scheduler.prefix_cache) == 0 and first.finish_reason == "length"
    _run(scheduler, [(_say(slots, "warm", prompts[0], SearchOptions(max_new_tokens=8)), hint)])  # stored now
    assert len(scheduler.prefix_cache) == 1
    with monkeypatch.context() as patch:
        patch.setattr(slots.decoder, "restore", broken)
        second = _say(slots, "b", prompts[1], SearchOptions(max_new_tokens=8))
        _run(scheduler, [(second, hint)])
    assert [(r.text, r.tokens) for r in (first, second)] == want
    stats = scheduler.stats()["prefix_cache"]
    assert stats["hits"] == 0 and stats["entries"] == 1  # dropped, then stored again by the turn that read it whole
    assert slots.free_slots == 4


def test_a_reranked_say_s_candidates_share_one_prefix_snapshot(pair: tuple[Model, SlotModel]) -> None:
    """Four candidates of a say arrive together, cold: read in one call, the prefix kept once; the
    next say's candidates all start from it. The chosen reply is the candidate the scorer likes."""
    mask, slots = pair
    _, prefix, prompts = _prompts(mask, find_persona("elda"))
    scheduler = Scheduler(slots, SchedulerConfig(max_batch=4, prefill_chunk=4096))
    hint = ("elda", len(prefix))
    for turn, prompt in enumerate(prompts[:2]):
        say = _say(slots, f"say{turn}", prompt)
        candidates = [_say(slots, f"say{turn}\x00{i}", prompt,
                           SearchOptions(max_new_tokens=6 + i, do_sample=True, temperature=0.9, seed=i))
                      for i in range(4)]
        assert scheduler.submit_reranked(say, candidates, lambda texts: [float(len(t)) for t in texts], hint)
        check_streams(run(scheduler), [say])
        assert say.text == max((c.text for c in candidates), key=len)
    stats = scheduler.stats()["prefix_cache"]
    assert (stats["misses"], stats["hits"], stats["entries"]) == (4, 4, 1)
    assert scheduler.counters["prefilled_together"] == 4 and slots.free_slots == 4
