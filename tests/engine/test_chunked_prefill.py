"""Chunked prefill: a long prompt joins over several steps while running streams keep decoding.

Same greedy tokens with and without chunking (both tiny families, prefix cache on and off, chunk
sizes that do and do not divide the prompt); interleaving, stats, cancel and deadline between chunks
on the counting model, whose forward calls are recorded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from test_scheduler import FIRST, Clock, CountingModel, check_streams, make_request, run

from npctalk.engine.dialogue import Turn
from npctalk.engine.errors import ConfigError
from npctalk.engine.kv_cache import KVCache
from npctalk.engine.model import Model
from npctalk.engine.npcs import PromptBuilder
from npctalk.engine.persona import find_persona
from npctalk.engine.protocol import ErrorCode
from npctalk.engine.request import DoneEvent, ErrorEvent, Event, Request, RequestKey, RequestState, TokenEvent
from npctalk.engine.sampling import SearchOptions
from npctalk.engine.scheduler import Scheduler, SchedulerConfig
from npctalk.engine.tokenizer import Tokenizer

GREEDY = SearchOptions(max_new_tokens=10)


@pytest.fixture
def counting(byte_tokenizer: Tokenizer) -> CountingModel:
    return CountingModel(byte_tokenizer)


class Recording:
    """Wraps a model and records each forward's input shape (batch, seq)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.manifest, self.tokenizer = inner.manifest, inner.tokenizer  # type: ignore[attr-defined]
        if hasattr(inner, "io"):
            self.io = inner.io  # type: ignore[attr-defined]
        self.shapes: list[tuple[int, int]] = []

    def new_cache(self, batch_size: int = 1) -> KVCache:
        return self.inner.new_cache(batch_size)  # type: ignore[attr-defined,no-any-return]

    def forward(self, input_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        self.shapes.append(tuple(np.asarray(input_ids).shape))  # type: ignore[arg-type]
        return self.inner.forward(input_ids, cache)  # type: ignore[attr-defined,no-any-return]


def _persona_prompts(model: Model) -> tuple[int, list[list[int]]]:
    """Two says to Bram (persona prefix length, prompt ids): different lines, one with history."""
    builder = PromptBuilder(model.manifest, model.tokenizer)
    persona = find_persona("bram")
    history = [Turn("user", "Good morning."), Turn("assistant", "Morning, friend.")]
    prompts = [builder.build(persona, [], "Got any iron?", {}, GREEDY.max_new_tokens, player="Mira"),
               builder.build(persona, history, "Tell me about Hilde.", {"location": "the forge"},
                             GREEDY.max_new_tokens, player="Mira")]
    return len(builder.persona_prefix(persona, "Mira")), prompts


def _replies(model: object, prompts: Sequence[list[int]], config: SchedulerConfig,
             prefix: tuple[str, int] | None, batched: bool = True) -> tuple[list[list[int]], Scheduler]:
    """Every prompt submitted at once; each request's reply tokens, and the scheduler."""
    scheduler = Scheduler(model, config)  # type: ignore[arg-type]
    scheduler.batched = batched
    requests = [Request(RequestKey(b"c", str(i)), list(p), GREEDY, model.tokenizer,  # type: ignore[attr-defined]
                        frozenset(model.manifest.eos_token_ids), model.manifest.max_context)  # type: ignore[attr-defined]
                for i, p in enumerate(prompts)]
    for request in requests:
        assert scheduler.submit(request, prefix)
    check_streams(run(scheduler), requests)
    return [r.tokens[r.prompt_tokens:] for r in requests], scheduler


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("cache_mb", [0, 64])
def test_chunked_prefill_gives_the_same_greedy_tokens(model: Model, cache_mb: int, batched: bool) -> None:
    """Reference: whole prompts, no prefix cache, each prompt alone. Chunked: both prompts submitted
    together (the second joins while the first decodes, in one padded batch or stepped alone), chunks
    that do and do not divide them; with the cache, the first prompt stores the persona prefix (a miss)
    and the second starts from it (a hit)."""
    prefix_len, prompts = _persona_prompts(model)
    reference = [_replies(model, [p], SchedulerConfig(prefill_chunk=0, prefix_cache_bytes=0), None)[0][0] for p in prompts]
    assert all(reference), "the reference replies are not empty"
    length = len(prompts[0])
    for chunk in (1, 3, 7, length - 1, length, length + 1):
        recording = Recording(model)
        config = SchedulerConfig(prefill_chunk=chunk, prefix_cache_bytes=cache_mb << 20)
        got, scheduler = _replies(recording, prompts, config, ("bram", prefix_len), batched)
        assert got == reference, f"chunk {chunk}, prefix cache {cache_mb} MiB"
        assert max(seq for _, seq in recording.shapes) <= chunk, "no forward ran more than one chunk"
        cache = scheduler.stats()["prefix_cache"]
        assert (cache["misses"], cache["hits"]) == ((1, 1) if cache_mb else (0, 0))


def test_a_piece_never_crosses_the_end_of_a_prefix_being_stored(counting: CountingModel) -> None:
    recording = Recording(counting)
    scheduler = Scheduler(recording, SchedulerConfig(prefill_chunk=8))  # type: ignore[arg-type]
    prompt = [FIRST + i % 50 for i in range(30)]
    request = make_request(counting, "r", prompt, max_new_tokens=3)
    assert scheduler.submit(request, ("npc", 12))
    events = run(scheduler)
    check_streams(events, [request])
    # Step 1: 0..8; step 2: 8..12 (the prefix, stored) then 12..16; step 3: 16..24; step 4: 24..30, then decode.
    assert recording.shapes[:6] == [(1, 8), (1, 4), (1, 4), (1, 8), (1, 6), (1, 1)]
    assert scheduler.stats()["prefix_cache"]["entries"] == 1
    again = make_request(counting, "again", prompt, max_new_tokens=3)
    recording.shapes.clear()
    assert scheduler.submit(again, ("npc", 12))
    run(scheduler)
    assert [seq for _, seq in recording.shapes[:3]] == [8, 8, 2], "a hit starts after the prefix"
    assert again.tokens == request.tokens


def test_running_streams_decode_between_the_chunks_of_a_long_prompt(counting: CountingModel) -> None:
    scheduler = Scheduler(counting, SchedulerConfig(prefill_chunk=8))
    running = make_request(counting, "running", [FIRST], max_new_tokens=40)
    assert scheduler.submit(running)
    events = scheduler.step()
    long = make_request(counting, "long", [FIRST + i % 60 for i in range(50)], max_new_tokens=3)
    assert scheduler.submit(long)
    steps_of_prefill = 0
    while long.first_token_at is None:
        before = running.completion_tokens
        step = scheduler.step()
        events += step
        steps_of_prefill += 1
        assert running.completion_tokens == before + 1, "the running stream got its token in this step"
        if long.first_token_at is None:
            stats = scheduler.stats()
            assert long.state is RequestState.PREFILLING
            assert (stats["active"], stats["prefilling"], stats["queued"]) == (2, 1, 0)
    assert steps_of_prefill == 7  # ceil(50 / 8)
    events += run(scheduler)
    check_streams(events, [running, long])


def test_whole_prompts_stall_the_running_stream_for_one_step_only(counting: CountingModel) -> None:
    """Chunk 0 (off): the long prompt runs in one forward, joins in the first step."""
    recording = Recording(counting)
    scheduler = Scheduler(recording, SchedulerConfig(prefill_chunk=0))  # type: ignore[arg-type]
    running = make_request(counting, "running", [FIRST], max_new_tokens=10)
    scheduler.submit(running)
    scheduler.step()
    long = make_request(counting, "long", [FIRST] * 50, max_new_tokens=3)
    scheduler.submit(long)
    scheduler.step()
    assert long.first_token_at is not None and (1, 50) in recording.shapes


def test_short_prompts_share_one_chunk_budget(counting: CountingModel) -> None:
    recording = Recording(counting)
    scheduler = Scheduler(recording, SchedulerConfig(prefill_chunk=10))  # type: ignore[arg-type]
    requests = [make_request(counting, str(i), [FIRST + i] * 4, max_new_tokens=5) for i in range(4)]
    for request in requests:
        scheduler.submit(request)
    scheduler.step()
    # 4 + 4 + 2 of the third: two join in the first step, the third finishes its prompt in the second.
    assert [r.state for r in requests] == [RequestState.DECODING] * 2 + [RequestState.PREFILLING, RequestState.QUEUED]
    assert recording.shapes[:3] == [(1, 4), (1, 4), (1, 2)]
    scheduler.step()
    assert requests[2].state is RequestState.DECODING and requests[3].state is RequestState.DECODING
    check_streams(run(scheduler), requests)


def test_a_short_prompt_overtakes_a_long_prefill_in_progress(counting: CountingModel) -> None:
    """A short line (at most half a chunk) starts its reply in the next step instead of after every
    chunk of a long prompt; the long one still advances in that step and finishes."""
    recording = Recording(counting)
    scheduler = Scheduler(recording, SchedulerConfig(prefill_chunk=8))  # type: ignore[arg-type]
    long = make_request(counting, "long", [FIRST + i % 60 for i in range(50)], max_new_tokens=3)
    scheduler.submit(long)
    scheduler.step()
    short = make_request(counting, "short", [FIRST + 5] * 4, max_new_tokens=3)
    too_long = make_request(counting, "five", [FIRST + 6] * 5, max_new_tokens=3)   # > half the chunk: waits
    scheduler.submit(too_long)
    scheduler.submit(short)
    recording.shapes.clear()
    events = scheduler.step()
    assert short.first_token_at is not None and long.state is RequestState.PREFILLING
    assert too_long.state is RequestState.QUEUED
    assert recording.shapes[:2] == [(1, 4), (1, 4)]           # the short prompt, then half a chunk of the long one
    events += run(scheduler)
    check_streams(events, [long, short, too_long])
    assert long.first_token_at is not None and too_long.first_token_at > long.first_token_at


def test_no_overtaking_past_a_full_batch_or_a_prefill_about_to_finish(counting: CountingModel) -> None:
    scheduler = Scheduler(counting, SchedulerConfig(max_batch=1, prefill_chunk=8))
    long = make_request(counting, "long", [FIRST] * 30, max_new_tokens=2)
    short = make_request(counting, "short", [FIRST] * 2, max_new_tokens=2)
    scheduler.submit(long)
    scheduler.step()
    scheduler.submit(short)
    scheduler.step()
    assert short.state is RequestState.QUEUED                # the only slot is the long prefill's
    check_streams(run(scheduler), [long, short])


def test_a_prefilling_request_holds_a_batch_slot(counting: CountingModel) -> None:
    scheduler = Scheduler(counting, SchedulerConfig(max_batch=2, max_queue=2, prefill_chunk=4))
    running = make_request(counting, "running", [FIRST], max_new_tokens=30)
    long = make_request(counting, "long", [FIRST] * 20, max_new_tokens=2)
    waiting = make_request(counting, "waiting", [FIRST], max_new_tokens=2)
    for request in (running, long, waiting):
        scheduler.submit(request)
    scheduler.step()
    scheduler.step()
    assert long.state is RequestState.PREFILLING and waiting.state is RequestState.QUEUED
    assert (scheduler.active_count, scheduler.queued_count) == (2, 1)
    check_streams(run(scheduler), [running, long, waiting])


def test_cancel_between_chunks_ends_the_prefill_and_stores_no_prefix(counting: CountingModel) -> None:
    recording = Recording(counting)
    scheduler = Scheduler(recording, SchedulerConfig(prefill_chunk=4))  # type: ignore[arg-type]
    running = make_request(counting, "running", [FIRST], max_new_tokens=20)
    long = make_request(counting, "long", [FIRST] * 40, max_new_tokens=5)
    scheduler.submit(running)
    scheduler.submit(long, ("npc", 30))
    events = scheduler.step() + scheduler.step()
    assert long.state is RequestState.PREFILLING
    assert scheduler.cancel(long.key)
    calls = len(recording.shapes)
    step = scheduler.step()
    events += step
    mine = [e for e in step if e.request is long]
    assert len(mine) == 1 and isinstance(mine[0], DoneEvent) and long.finish_reason == "cancelled"
    assert long.completion_tokens == 0 and long.text == "" and long.first_token_at is None
    assert recording.shapes[calls:] == [(1, 1)], "only the running stream's decode ran after the cancel"
    assert scheduler.stats()["prefilling"] == 0 and scheduler.stats()["prefix_cache"]["entries"] == 0
    events += run(scheduler)
    check_streams(events, [running, long])
    assert running.finish_reason == "length" and scheduler.counters["cancelled"] == 1


def test_deadline_ends_a_request_between_chunks(counting: CountingModel) -> None:
    clock = Clock()
    scheduler = Scheduler(counting, SchedulerConfig(prefill_chunk=4), clock=clock)
    long = make_request(counting, "long", [FIRST] * 40, deadline=1.0, max_new_tokens=5)
    scheduler.submit(long)
    events: list[Event] = scheduler.step()
    assert long.state is RequestState.PREFILLING
    clock.now = 1.5
    events += run(scheduler)
    check_streams(events, [long])
    assert isinstance(events[-1], ErrorEvent) and events[-1].code is ErrorCode.TIMEOUT
    assert long.completion_tokens == 0 and not [e for e in events if isinstance(e, TokenEvent)]


def test_a_failing_chunk_fails_only_its_request(counting: CountingModel) -> None:
    scheduler = Scheduler(counting, SchedulerConfig(prefill_chunk=4))
    long = make_request(counting, "long", [FIRST] * 20, max_new_tokens=5)
    later = make_request(counting, "later", [FIRST] * 3, max_new_tokens=3)  # > half a chunk: does not overtake
    scheduler.submit(long)
    scheduler.submit(later)
    events = scheduler.step()
    counting.fail_next = True
    events += run(scheduler)
    check_streams(events, [long, later])
    assert long.state is RequestState.FAILED and later.finish_reason == "length"
    error = next(e for e in events if isinstance(e, ErrorEvent))
    assert error.code is ErrorCode.INTERNAL and "reading the prompt" in error.message


@pytest.mark.parametrize("chunk", [-1, True, 2.5])
def test_prefill_chunk_must_be_a_token_count(chunk: object) -> None:
    with pytest.raises(ConfigError, match="prefill_chunk"):
        SchedulerConfig(prefill_chunk=chunk)  # type: ignore[arg-type]
