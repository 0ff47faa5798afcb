"""Scheduler: continuous batching, cancellation, deadlines, backpressure; batched == single-stream."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from types import SimpleNamespace

import numpy as np
import pytest
from fake_model import ScriptedModel

from npctalk.engine.batch import DecodeBatch, supports_padding
from npctalk.engine.bundle import LicenseInfo, Manifest, SourceInfo
from npctalk.engine.errors import ContextOverflowError, RequestStateError, ServeError
from npctalk.engine.generator import Generator, GeneratorParams
from npctalk.engine.kv_cache import KVCache
from npctalk.engine.model import Model
from npctalk.engine.protocol import ErrorCode
from npctalk.engine.request import DoneEvent, ErrorEvent, Event, Request, RequestKey, RequestState, TokenEvent
from npctalk.engine.sampling import SearchOptions
from npctalk.engine.scheduler import Scheduler, SchedulerConfig
from npctalk.engine.stream import ReplyStream
from npctalk.engine.tokenizer import Tokenizer

FIRST, LAST = 100, 199  # the counting model's tokens cycle through these ids


class CountingModel:
    """Batch-aware fake: each row's next token is its last input token + 1 (cycling FIRST..LAST).

    Rows are independent and the KV cache has no layers, so only the mask (padding) is exercised;
    ``batch_sizes`` records every forward's batch size; ``fail_next`` makes the next one raise,
    ``fail_batch`` every one of that many rows.
    """

    def __init__(self, tokenizer: Tokenizer, *, eos: int = 0, max_context: int = 256) -> None:
        self.tokenizer = tokenizer
        self.manifest = Manifest(
            name="counting", architecture="llama", dialogue_format="eos_joined", num_layers=1,
            num_attention_heads=1, num_kv_heads=1, head_dim=1, hidden_size=1, vocab_size=tokenizer.vocab_size,
            max_context=max_context, eos_token_ids=(eos,), pad_token_id=eos, bos_token_id=None, dtype="fp32",
            kv_dtype="fp32", device="cpu", source=SourceInfo("folder", "counting"), license=LicenseInfo("MIT", "L", ""),
        )
        self.batch_sizes: list[int] = []
        self.fail_next = False
        self.fail_batch: int | None = None  # every forward of this many rows raises

    def new_cache(self, batch_size: int = 1) -> KVCache:
        return KVCache(0, batch_size, 1, 1, np.float32)

    def forward(self, input_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        batch, seq = input_ids.shape
        if self.fail_next or batch == self.fail_batch:
            self.fail_next = False
            raise RuntimeError("scripted failure")
        mask = np.concatenate([cache.mask, np.ones((batch, seq), dtype=np.int64)], axis=1)
        if mask.shape[1] > self.manifest.max_context:
            raise ContextOverflowError("counting model context exceeded")
        self.batch_sizes.append(batch)
        cache.update([], [], mask)
        logits = np.zeros((batch, self.manifest.vocab_size), dtype=np.float32)
        for row, last in enumerate(input_ids[:, -1]):
            logits[row, FIRST + (int(last) - FIRST + 1) % (LAST - FIRST + 1) if FIRST <= last <= LAST else FIRST] = 10.0
        return logits


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def counting(byte_tokenizer: Tokenizer) -> CountingModel:
    return CountingModel(byte_tokenizer)


def make_request(model: object, rid: str, prompt: Sequence[int], *, client: bytes = b"c", deadline: float = float("inf"),
                 **options: object) -> Request:
    m = model.manifest  # type: ignore[attr-defined]
    return Request(RequestKey(client, rid), list(prompt), SearchOptions(**options), model.tokenizer,  # type: ignore[attr-defined]
                   frozenset(m.eos_token_ids), m.max_context, received_at=0.0, deadline=deadline)


def run(scheduler: Scheduler, max_steps: int = 10_000) -> list[Event]:
    events: list[Event] = []
    for _ in range(max_steps):
        if not scheduler.has_work:
            return events
        events += scheduler.step()
    raise AssertionError("the scheduler did not finish")


def check_streams(events: Iterable[Event], requests: Iterable[Request]) -> None:
    """Every request: seq 0.. without gaps, exactly one terminal event, last; tokens joined == text."""
    for request in requests:
        mine = [e for e in events if e.request is request]
        assert [e.seq for e in mine] == list(range(len(mine)))
        assert [isinstance(e, (DoneEvent, ErrorEvent)) for e in mine] == [False] * (len(mine) - 1) + [True]
        assert "".join(e.text for e in mine if isinstance(e, TokenEvent)) == request.text
        assert not request.live


def test_requests_share_decode_steps_and_join_between_steps(counting: CountingModel) -> None:
    scheduler = Scheduler(counting, SchedulerConfig(max_batch=8))
    a = make_request(counting, "a", [FIRST], max_new_tokens=12)
    b = make_request(counting, "b", [FIRST + 50, FIRST + 51, FIRST + 52], max_new_tokens=6)
    assert scheduler.submit(a) and scheduler.submit(b)
    events = scheduler.step() + scheduler.step()
    late = make_request(counting, "late", [FIRST + 20], max_new_tokens=4)
    assert scheduler.submit(late)  # joins between steps, while a and b are decoding
    events += run(scheduler)
    check_streams(events, [a, b, late])
    decode_batches = [n for n in counting.batch_sizes]
    assert max(decode_batches) == 3, "the late request decoded in the same forward as a and b"
    assert a.tokens[1:] == [FIRST + 1 + i for i in range(12)]  # rows stayed independent through the re-packing
    assert late.tokens[1:] == [FIRST + 21 + i for i in range(4)]
    assert (a.finish_reason, b.finish_reason, late.finish_reason) == ("length", "length", "length")


def test_emit_gets_what_admission_made_before_the_decode_step_runs(counting: CountingModel) -> None:
    """Requests joining while another decodes: given ``emit``, what reading their prompts made (here
    a one-token reply, whole, and a longer reply's start) is handed out before that step's decode
    forward runs; every stream's events, emitted and returned, are whole and in order."""
    scheduler = Scheduler(counting, SchedulerConfig(max_batch=8))
    a = make_request(counting, "a", [FIRST], max_new_tokens=8)
    assert scheduler.submit(a)
    events = scheduler.step() + scheduler.step()
    short = make_request(counting, "short", [FIRST + 20, FIRST + 21], max_new_tokens=1)
    late = make_request(counting, "late", [FIRST + 40], max_new_tokens=4)
    assert scheduler.submit(short) and scheduler.submit(late)
    order: list[tuple[str, object]] = []
    forward = counting.forward

    def recording(input_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        order.append(("forward", input_ids.shape[0]))
        return forward(input_ids, cache)

    def emit(early: list[Event]) -> None:
        order.append(("emit", [e.request.key.id for e in early if isinstance(e, DoneEvent)]))
        events.extend(early)

    counting.forward = recording  # type: ignore[method-assign]
    events += scheduler.step(emit=emit)
    # two prompt reads, then the one-token reply's done goes out, then the decode step of a and late
    assert order == [("forward", 1), ("forward", 1), ("emit", ["short"]), ("forward", 2)]
    for _ in range(50):
        if not scheduler.has_work:
            break
        events += scheduler.step(emit=emit)
    check_streams(events, [a, short, late])
    assert late.tokens[1:] == [FIRST + 41 + i for i in range(4)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("batched", [True, False])
def test_batched_decoding_matches_single_stream_generation(family: str, batched: bool,
                                                           request: pytest.FixtureRequest) -> None:
    """Same text, tokens and finish reason as Generator + ReplyStream alone, greedy and sampled,
    with prompts of different lengths padded into one batch (or stepped alone without padding)."""
    model: Model = request.getfixturevalue(f"{family}_model")
    prompts = ["Hello traveller", "The blacksmith forges swords and horseshoes all day long.", "Dragons 🐉"]
    options = [SearchOptions(max_new_tokens=24),
               SearchOptions(max_new_tokens=30, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3),
               SearchOptions(max_new_tokens=20, do_sample=True, seed=5, repetition_penalty=1.2, no_repeat_ngram_size=3)]
    expected = []
    for text, opts in zip(prompts, options):
        params = GeneratorParams(model)
        params.set_search_options(opts)
        gen = Generator(model, params)
        gen.append_tokens(model.tokenizer.encode(text))
        stream = ReplyStream(gen)
        expected.append((stream.read(), stream.finish_reason, gen.reply_tokens))
    scheduler = Scheduler(model, SchedulerConfig(max_batch=4))
    scheduler.batched = batched
    requests = [Request(RequestKey(b"c", str(i)), model.tokenizer.encode(t), o, model.tokenizer,
                        frozenset(model.manifest.eos_token_ids), model.manifest.max_context)
                for i, (t, o) in enumerate(zip(prompts, options))]
    for r in requests:
        assert scheduler.submit(r)
    events = run(scheduler)
    check_streams(events, requests)
    for r, (text, reason, reply_tokens) in zip(requests, expected):
        assert (r.text, r.finish_reason, r.tokens[r.prompt_tokens:]) == (text, reason, reply_tokens)


def test_padded_batch_logits_match_each_stream_alone(model: Model) -> None:
    prompts = [model.tokenizer.encode(t) for t in ("Hi", "What is your name? My name is Bram", "Café crème")]
    alone, caches = [], []
    for ids in prompts:
        cache = model.new_cache()
        model.forward(np.array([ids]), cache)
        caches.append(cache)
        step = model.new_cache()
        alone.append(model.forward(np.array([ids + [5]]), step)[0])
    batch: DecodeBatch[int] = DecodeBatch(model)
    batch.add(list(enumerate(caches)))
    assert batch.cache.length == max(len(p) for p in prompts)
    np.testing.assert_allclose(batch.forward([5, 5, 5]), np.stack(alone), atol=1e-4)
    # Removing the longest row trims the padding every remaining row shares.
    batch.remove({1})
    assert batch.cache.length == max(len(prompts[0]), len(prompts[2])) + 1
    assert supports_padding(model)


def test_cancel_ends_a_stream_within_one_step(counting: CountingModel) -> None:
    scheduler = Scheduler(counting)
    keep = make_request(counting, "keep", [FIRST], max_new_tokens=20)
    stop = make_request(counting, "stop", [FIRST + 30], max_new_tokens=200)
    scheduler.submit(keep)
    scheduler.submit(stop)
    events = scheduler.step() + scheduler.step()
    assert scheduler.cancel(stop.key) and not scheduler.cancel(RequestKey(b"other", "stop"))
    produced_before = stop.completion_tokens
    after = scheduler.step()
    mine = [e for e in after if e.request is stop]
    assert len(mine) == 1 and isinstance(mine[0], DoneEvent) and stop.finish_reason == "cancelled"
    assert stop.completion_tokens == produced_before
    events += after + run(scheduler)
    check_streams(events, [keep, stop])
    assert keep.finish_reason == "length" and not scheduler.cancel(stop.key)
    assert scheduler.stats()["cancelled"] == 1 and scheduler.stats()["completed"] == 1


def test_cancel_while_queued_and_cancel_client(counting: CountingModel) -> None:
    scheduler = Scheduler(counting, SchedulerConfig(max_batch=1, max_queue=4))
    running = make_request(counting, "run", [FIRST], client=b"A", max_new_tokens=50)
    waiting = [make_request(counting, f"w{i}", [FIRST], client=b"B", max_new_tokens=5) for i in range(3)]
    for r in [running, *waiting]:
        scheduler.submit(r)
    events = scheduler.step()
    assert scheduler.active_count == 1 and scheduler.queued_count == 3
    assert scheduler.live_clients() == {b"A", b"B"}
    assert scheduler.cancel_client(b"B") == 3
    events += scheduler.step()
    for r in waiting:
        assert r.finish_reason == "cancelled" and r.completion_tokens == 0 and r.first_token_at is None
    assert scheduler.queued_count == 0 and scheduler.active_count == 1
    events += run(scheduler)
    check_streams(events, [running, *waiting])


def test_deadline_fails_queued_and_running_requests_with_timeout(counting: CountingModel) -> None:
    clock = Clock()
    scheduler = Scheduler(counting, SchedulerConfig(max_batch=1, max_queue=2), clock=clock)
    running = make_request(counting, "run", [FIRST], deadline=5.0, max_new_tokens=100)
    queued = make_request(counting, "queued", [FIRST], deadline=3.0, max_new_tokens=100)
    scheduler.submit(running)
    scheduler.submit(queued)
    events = scheduler.step()
    clock.now = 3.5
    events += scheduler.step()
    assert queued.state is RequestState.FAILED and running.state is RequestState.DECODING
    clock.now = 5.0
    events += run(scheduler)
    check_streams(events, [running, queued])
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert [(e.request.key.id, e.code) for e in errors] == [("queued", ErrorCode.TIMEOUT), ("run", ErrorCode.TIMEOUT)]
    assert "deadline" in errors[0].message


def test_capacity_is_bounded(counting: CountingModel) -> None:
    scheduler = Scheduler(counting, SchedulerConfig(max_batch=2, max_queue=3))
    accepted = [scheduler.submit(make_request(counting, str(i), [FIRST], max_new_tokens=3)) for i in range(8)]
    assert accepted == [True] * 5 + [False] * 3
    scheduler.step()
    assert scheduler.active_count == 2 and scheduler.queued_count == 3


def test_whole_prompt_budget_spreads_long_prompts_over_steps(counting: CountingModel) -> None:
    scheduler = Scheduler(counting, SchedulerConfig(max_batch=8, prefill_chunk=0, prefill_tokens=10))
    for i in range(3):
        scheduler.submit(make_request(counting, str(i), [FIRST] * 8, max_new_tokens=5))
    scheduler.step()
    assert (scheduler.active_count, scheduler.queued_count) == (1, 2)  # one long prompt per step
    scheduler.step()
    assert (scheduler.active_count, scheduler.queued_count) == (2, 1)


def test_eos_stops_and_is_never_text(byte_tokenizer: Tokenizer) -> None:
    model = CountingModel(byte_tokenizer, eos=FIRST + 3)  # counting up from FIRST reaches EOS in 3 steps
    scheduler = Scheduler(model)
    request = make_request(model, "r", [FIRST], max_new_tokens=50)
    scheduler.submit(request)
    events = run(scheduler)
    check_streams(events, [request])
    assert request.finish_reason == "stop" and request.tokens[-1] == FIRST + 3
    assert request.text == byte_tokenizer.decode([FIRST + 1, FIRST + 2]).replace("\ufffd", "")  # EOS not shown


@pytest.mark.parametrize("ahead", [True, False])
def test_a_failing_forward_fails_its_rows_and_the_scheduler_goes_on(counting: CountingModel, ahead: bool) -> None:
    """The decode step of the two rows fails (on the worker thread with ``decode_ahead``, joined by
    the next step): both rows fail with ``internal``, and a later request runs as usual."""
    scheduler = Scheduler(counting, SchedulerConfig(decode_ahead=ahead))
    first = [make_request(counting, str(i), [FIRST], max_new_tokens=10) for i in range(2)]
    for r in first:
        scheduler.submit(r)
    counting.fail_batch = 2  # prompts are prefilled one by one: only the decode step has two rows
    events = scheduler.step()  # prefills, first tokens, the decode step (failing)
    if ahead:  # launched on the worker: the next step joins it
        assert not any(isinstance(e, ErrorEvent) for e in events)
        events += scheduler.step()
    assert all(r.state is RequestState.FAILED for r in first)
    assert scheduler.active_count == 0  # the failed rows left the batch: no step runs for them
    counting.fail_batch = None
    assert {e.code for e in events if isinstance(e, ErrorEvent)} == {ErrorCode.INTERNAL}
    later = make_request(counting, "later", [FIRST], max_new_tokens=4)
    scheduler.submit(later)
    events += run(scheduler)
    check_streams(events, [*first, later])
    assert later.finish_reason == "length" and scheduler.stats()["failed"] == 2


def test_state_machine_refuses_illegal_moves(counting: CountingModel) -> None:
    request = make_request(counting, "r", [FIRST])
    with pytest.raises(RequestStateError, match="cannot go from queued to decoding"):
        request.advance(RequestState.DECODING)
    request.finish("cancelled", 1.0)
    with pytest.raises(RequestStateError, match="nowhere"):
        request.fail(ErrorCode.TIMEOUT, "late", 2.0)  # a second terminal message is impossible


def test_without_padding_support_streams_step_alone(counting: CountingModel) -> None:
    counting.io = SimpleNamespace(attention_mask=None, position_ids=None)  # type: ignore[attr-defined]
    scheduler = Scheduler(counting)
    assert not scheduler.batched
    requests = [make_request(counting, str(i), [FIRST + 10 * i], max_new_tokens=5) for i in range(3)]
    for r in requests:
        scheduler.submit(r)
    events = run(scheduler)
    check_streams(events, requests)
    assert set(counting.batch_sizes) == {1}
    assert requests[2].tokens[1:] == [FIRST + 21 + i for i in range(5)]


def test_stats_report_throughput(counting: CountingModel) -> None:
    scheduler = Scheduler(counting)
    for i in range(4):
        scheduler.submit(make_request(counting, str(i), [FIRST], max_new_tokens=8))
    assert scheduler.stats()["queued"] == 4
    run(scheduler)
    stats = scheduler.stats()
    assert stats["tokens"] == 32 and stats["tokens_per_s"] > 0 and stats["active"] == stats["queued"] == 0


# --- reranked says ---------------------------------------------------------------------------------


def _candidates(counting: CountingModel, rid: str, lengths: Sequence[int], deadline: float = float("inf")) -> list[Request]:
    return [make_request(counting, f"{rid}\x00{i}", [FIRST], max_new_tokens=n, deadline=deadline)
            for i, n in enumerate(lengths)]


def test_a_reranked_say_sends_only_the_chosen_candidate(byte_tokenizer: Tokenizer) -> None:
    script = byte_tokenizer.encode("Hi! Mind the sparks, friend, and mind the dog.")
    model = ScriptedModel(byte_tokenizer, script, eos=0)
    scheduler = Scheduler(model, SchedulerConfig(max_batch=8))  # type: ignore[arg-type]
    say = make_request(model, "say", script[:2], max_new_tokens=99)
    seen: list[list[str]] = []

    def longest(texts: list[str]) -> list[float]:
        seen.append(texts)
        return [float(len(t)) for t in texts]

    candidates = [make_request(model, f"say\x00{i}", script[:2], max_new_tokens=n) for i, n in enumerate([3, 9, 5])]
    assert scheduler.submit_reranked(say, candidates, longest)
    events = run(scheduler)
    check_streams(events, [say])
    assert [type(e) for e in events] == [TokenEvent, DoneEvent], "nothing streams until the choice, then one message"
    assert seen == [[c.text for c in candidates]] and len({len(t) for t in seen[0]}) == 3
    assert say.text == candidates[1].text == byte_tokenizer.decode(script[2:11])
    assert say.completion_tokens == 9 and say.finish_reason == "length"
    assert scheduler.counters["completed"] == 1 and not scheduler.has_work


def test_reranked_candidates_batch_with_other_streams(counting: CountingModel) -> None:
    scheduler = Scheduler(counting, SchedulerConfig(max_batch=8))
    say = make_request(counting, "say", [FIRST])
    other = make_request(counting, "other", [FIRST + 40], max_new_tokens=5)
    candidates = _candidates(counting, "say", [3, 9, 5])
    assert scheduler.submit_reranked(say, candidates, lambda texts: [0.0, 1.0, 0.0]) and scheduler.submit(other)
    events = run(scheduler)
    check_streams(events, [say, other])
    assert not [e for e in events if e.request in candidates], "candidates' messages are internal"
    assert max(counting.batch_sizes) == 4, "the candidates decoded in one batch with the other stream"
    assert say.tokens == candidates[1].tokens and other.tokens[1:] == [FIRST + 41 + i for i in range(5)]


def test_cancelling_a_reranked_say_ends_its_candidates(counting: CountingModel) -> None:
    scheduler = Scheduler(counting)
    say = make_request(counting, "say", [FIRST])
    candidates = _candidates(counting, "say", [50, 50])
    assert scheduler.submit_reranked(say, candidates, lambda texts: [0.0] * len(texts))
    events = scheduler.step() + scheduler.step()
    assert scheduler.cancel(say.key)
    events += run(scheduler)
    check_streams(events, [say])
    assert say.finish_reason == "cancelled" and say.text == ""
    assert all(c.finish_reason == "cancelled" for c in candidates) and not scheduler.has_work
    assert scheduler.counters["cancelled"] == 1


def test_a_reranked_say_times_out_and_a_failing_scorer_fails_only_it(counting: CountingModel) -> None:
    clock = Clock()
    scheduler = Scheduler(counting, clock=clock)
    late = make_request(counting, "late", [FIRST], deadline=1.0)
    assert scheduler.submit_reranked(late, _candidates(counting, "late", [40, 40], deadline=1.0), lambda t: [0.0] * len(t))
    events = scheduler.step()
    clock.now = 2.0
    events += run(scheduler)
    check_streams(events, [late])
    assert isinstance(events[-1], ErrorEvent) and events[-1].code is ErrorCode.TIMEOUT

    def broken(texts: list[str]) -> list[float]:
        raise ValueError("scorer broke")

    bad = make_request(counting, "bad", [FIRST])
    fine = make_request(counting, "fine", [FIRST], max_new_tokens=3)
    assert scheduler.submit_reranked(bad, _candidates(counting, "bad", [2, 2]), broken) and scheduler.submit(fine)
    events = run(scheduler)
    check_streams(events, [bad, fine])
    error = [e for e in events if e.request is bad][0]
    assert isinstance(error, ErrorEvent) and error.code is ErrorCode.INTERNAL and "scorer broke" in error.message
    assert fine.finish_reason == "length"


def test_reranked_candidates_count_against_capacity(counting: CountingModel) -> None:
    scheduler = Scheduler(counting, SchedulerConfig(max_batch=2, max_queue=1))
    say = make_request(counting, "say", [FIRST])
    # The say is live itself: with room for 3, three candidates would leave the third out unqueued.
    assert not scheduler.submit_reranked(say, _candidates(counting, "say", [2, 2, 2]), lambda t: [0.0] * len(t))
    assert not scheduler.has_work
    two = _candidates(counting, "say", [2, 2])
    assert scheduler.submit_reranked(say, two, lambda t: [0.0] * len(t))
    assert all(scheduler.has_live(c.key) for c in two) and scheduler.stats()["queued"] == 2
    with pytest.raises(ServeError, match="already live"):
        scheduler.submit_reranked(say, _candidates(counting, "say", [2]), lambda t: [0.0])
