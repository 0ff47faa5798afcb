"""The slot decoder behind the scheduler and a real server: same replies as Model, slots given back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from server_process import LONG_STREAMS, ServerProcess, recv, send
from test_scheduler import check_streams, make_request, run

from npctalk.engine.bundle import load_manifest
from npctalk.engine.errors import ContextOverflowError, GenerationError, ServeError
from npctalk.engine.model import Model
from npctalk.engine.rerank import likelihood_scores
from npctalk.engine.request import ErrorEvent, Request, RequestKey
from npctalk.engine.sampling import SearchOptions
from npctalk.engine.scheduler import Scheduler, SchedulerConfig
from npctalk.engine.server import ServerConfig, load_model
from npctalk.engine.slot_model import SlotModel

TEXTS = ["Hello traveller", "The blacksmith forges swords and horseshoes all day long.", "Dragons 🐉"]
OPTIONS = [SearchOptions(max_new_tokens=24),
           SearchOptions(max_new_tokens=30, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3),
           SearchOptions(max_new_tokens=20, do_sample=True, seed=5, repetition_penalty=1.2, no_repeat_ngram_size=3)]


@pytest.fixture(params=["gpt2", "llama"])
def pair(request: pytest.FixtureRequest) -> tuple[Model, SlotModel]:
    """The mask-layout Model and a slot model of the same tiny weights (4 slots of 128 tokens)."""
    mask = Model(request.getfixturevalue(f"{request.param}_bundle"), provider="cpu", intra_op_threads=1)
    slots = SlotModel.open(request.getfixturevalue(f"{request.param}_slots_bundle"), 4, 128, provider="cpu",
                           intra_op_threads=1)
    return mask, slots


def _requests(model: Model | SlotModel, options: list[SearchOptions] = OPTIONS) -> list[Request]:
    return [Request(RequestKey(b"c", str(i)), model.tokenizer.encode(t), o, model.tokenizer,
                    frozenset(model.manifest.eos_token_ids), model.manifest.max_context)
            for i, (t, o) in enumerate(zip(TEXTS, options))]


def _replies(model: Model | SlotModel, options: list[SearchOptions]) -> list[list[int]]:
    """Every token of each request (prompt + reply), all submitted at once to a 3-row scheduler."""
    scheduler = Scheduler(model, SchedulerConfig(max_batch=3, prefix_cache_bytes=0))
    requests = _requests(model, options)
    assert all(scheduler.submit(r) for r in requests)
    check_streams(run(scheduler), requests)
    return [r.tokens for r in requests]


def test_scheduler_on_slots_gives_the_replies_of_the_padded_batch(pair: tuple[Model, SlotModel]) -> None:
    """Greedy and sampled requests, different prompt lengths, chunked prefill, a late joiner."""
    mask, slots = pair
    results = []
    for model in (mask, slots):
        scheduler = Scheduler(model, SchedulerConfig(max_batch=3, prefill_chunk=4, prefix_cache_bytes=0))
        requests = _requests(model)
        for r in requests[:2]:
            assert scheduler.submit(r)
        events = scheduler.step() + scheduler.step()
        assert scheduler.submit(requests[2])  # joins while the others decode
        events += run(scheduler)
        check_streams(events, requests)
        results.append([(r.text, r.finish_reason, r.tokens) for r in requests])
    assert results[0] == results[1]
    assert slots.free_slots == 4, "every slot came back when its stream ended"


def test_cancelled_and_failed_streams_give_their_slots_back(pair: tuple[Model, SlotModel]) -> None:
    _, slots = pair
    scheduler = Scheduler(slots, SchedulerConfig(max_batch=3, prefill_chunk=2, prefix_cache_bytes=0))
    long = make_request(slots, "long", slots.tokenizer.encode(TEXTS[1]), max_new_tokens=50)
    decoding = make_request(slots, "dec", slots.tokenizer.encode(TEXTS[0]), max_new_tokens=50)
    assert scheduler.submit(decoding) and scheduler.submit(long)
    for _ in range(6):
        scheduler.step()
    assert slots.free_slots == 2
    scheduler.cancel(long.key)       # mid-prefill or decoding: either way its slot returns
    scheduler.cancel(decoding.key)
    scheduler.step()
    assert slots.free_slots == 4 and not scheduler.has_work
    too_long = make_request(slots, "big", list(range(1, 100)) * 2, max_new_tokens=4)  # 198 > the slots' 128
    assert scheduler.submit(too_long)
    run(scheduler)
    assert too_long.finish_reason is None and slots.free_slots == 4


def test_slot_model_contract(pair: tuple[Model, SlotModel]) -> None:
    mask, slots = pair
    assert slots.manifest.max_context == 128 and slots.provider == "cpu"
    caches = [slots.new_cache() for _ in range(4)]
    with pytest.raises(ServeError, match="slots are in use"):
        slots.new_cache()
    logits = slots.forward(np.array([[5, 6, 7]]), caches[0])
    want = mask.forward(np.array([[5, 6, 7]]), mask.new_cache())
    np.testing.assert_allclose(logits, want, atol=1e-5)
    with pytest.raises(ContextOverflowError):
        slots.forward(np.ones((1, 126), np.int64), caches[0])
    with pytest.raises(GenerationError):
        slots.forward(np.array([[1], [2]]), caches[1])
    caches[0].rewind(1)
    assert caches[0].length == 1
    for cache in caches:
        cache.close()
    caches[0].close()                 # twice is fine
    assert slots.free_slots == 4
    dropped = slots.new_cache()
    del dropped                       # a cache nobody holds frees its slot too
    assert slots.free_slots == 4
    with pytest.raises(GenerationError, match="open SlotCache"):
        slots.forward(np.array([[1]]), caches[0])


def test_reranking_scores_run_on_slots(pair: tuple[Model, SlotModel]) -> None:
    from npctalk.engine.dialogue import DialogueFormatter
    from npctalk.engine.persona import builtin_personas

    mask, slots = pair
    persona = builtin_personas()["bram"]
    replies = ["I am Bram, the blacksmith.", "Lovely weather.", "Swords!"]
    scores = [likelihood_scores(m, DialogueFormatter(m.manifest, m.tokenizer), replies, persona) for m in (mask, slots)]
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-4)
    assert slots.free_slots == 4


def test_server_loads_slots_bundles_on_the_slot_decoder(gpt2_slots_bundle: Path, gpt2_bundle: Path) -> None:
    config = ServerConfig(scheduler=SchedulerConfig(max_batch=2))
    model, used = load_model(gpt2_slots_bundle, config, provider="cpu", slot_context=64)
    assert isinstance(model, SlotModel) and model.decoder.slots == 6 and model.manifest.max_context == 64
    assert used is config, "on the CPU the slot decoder keeps the configuration (persona prefixes cached too)"
    plain, same = load_model(gpt2_bundle, config, provider="cpu")
    assert isinstance(plain, Model) and same is config


@pytest.fixture(scope="module")
def slots_server(gpt2_slots_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(gpt2_slots_bundle, tmp_path_factory.mktemp("slots-server"), *LONG_STREAMS,
                         "--slot-context", "500").start()
    try:
        yield proc
    finally:
        proc.stop()


def test_a_real_server_streams_two_npcs_from_slots(slots_server: ServerProcess, gpt2_bundle: Path,
                                                   tmp_path: Path) -> None:
    """The same greedy replies from a slots bundle as from the mask bundle, two NPCs at once."""
    hello = slots_server.request("hello")
    assert hello["model"]["max_context"] == 500  # the slot capacity, not the model's 512
    assert hello["model"]["inplace_kv"] is True  # the slots are written in place
    texts = {}
    for proc in (slots_server, ServerProcess(gpt2_bundle, tmp_path, *LONG_STREAMS).start()):
        try:
            sock = proc.dealer()
            for rid, npc in (("a", "bram"), ("b", "elda")):
                send(sock, op="say", id=rid, npc=npc, player="p", text="Good morning!", max_new_tokens=30)
            streams: dict[str, list] = {"a": [], "b": []}
            while not all(s and s[-1]["type"] in ("done", "error") for s in streams.values()):
                message = recv(sock, timeout=20.0)
                streams[message["id"]].append(message)
            texts[proc is slots_server] = {k: (v[-1]["type"], v[-1].get("text")) for k, v in streams.items()}
            assert proc.stats()["active"] == 0
        finally:
            if proc is not slots_server:
                proc.stop()
    assert texts[True] == texts[False] and texts[True]["a"][0] == "done"


def test_all_greedy_steps_take_the_device_argmax_and_give_the_same_replies(pair: tuple[Model, SlotModel],
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain greedy rows need no logits: only the argmax leaves the device; a row with a repetition
    penalty in the batch brings each row's top logits back (``forward_top``). Replies equal the
    padded batch's."""
    from npctalk.engine.slot_model import SlotBatch

    mask, slots = pair
    calls = {"greedy": 0, "logits": 0}
    for name in ("forward_greedy", "forward", "forward_top"):
        original = getattr(SlotBatch, name)

        def counted(self, *args, _original=original, _name=name):  # type: ignore[no-untyped-def]
            calls["greedy" if _name == "forward_greedy" else "logits"] += 1
            return _original(self, *args)

        monkeypatch.setattr(SlotBatch, name, counted)
    for options in ([SearchOptions(max_new_tokens=20)] * 3,
                    [SearchOptions(max_new_tokens=20)] * 2 + [SearchOptions(max_new_tokens=20, repetition_penalty=1.3)]):
        assert _replies(mask, options) == _replies(slots, options)
        if options[-1].repetition_penalty == 1.0:
            assert calls["greedy"] > 0 and calls["logits"] == 0
        else:
            assert calls["logits"] > 0


def test_a_mixed_batch_takes_device_argmax_for_plain_greedy_rows(pair: tuple[Model, SlotModel],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """One row needs logits (repetition penalty): the step brings them back, the other rows still
    take the device's argmax (sampled from logits only for their first token, at prefill), and
    every reply equals the padded batch's."""
    from collections import Counter

    mask, slots = pair
    sampled: Counter[str] = Counter()
    original = Request.pick  # the tiny vocabulary is sampled whole: every pick goes through it

    def spy(self: Request, logits: np.ndarray):  # type: ignore[no-untyped-def]
        sampled[self.key.id] += 1
        return original(self, logits)

    options = [SearchOptions(max_new_tokens=12)] * 2 + [SearchOptions(max_new_tokens=12, repetition_penalty=1.3)]
    expected = _replies(mask, options)
    monkeypatch.setattr(Request, "pick", spy)
    assert _replies(slots, options) == expected
    assert sampled["0"] == 1 and sampled["1"] == 1 and sampled["2"] > 1


def test_open_model_picks_the_slot_decoder_for_slots_bundles(gpt2_slots_bundle: Path, gpt2_bundle: Path) -> None:
    from npctalk.engine.slot_model import open_model

    model = open_model(gpt2_slots_bundle, provider="cpu", slots=2)
    assert isinstance(model, SlotModel) and model.decoder.slots == 2
    assert model.manifest.max_context == load_manifest(gpt2_slots_bundle).max_context  # under the 2048 default
    assert isinstance(open_model(gpt2_bundle, provider="cpu"), Model)


def test_terminal_chat_on_a_slots_bundle_says_what_the_mask_bundle_says(llama_slots_bundle: Path,
                                                                          llama_bundle: Path) -> None:
    import subprocess
    import sys

    outs = []
    for bundle in (llama_bundle, llama_slots_bundle):
        cmd = [sys.executable, "-m", "npctalk.engine.cli", "chat", "--model", str(bundle), "--temperature", "0",
               "--max-new-tokens", "12", "--npc", "bram", "--provider", "cpu"]
        done = subprocess.run(cmd, input="Hello!\nWho are you?\n/quit\n", capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        outs.append(done.stdout)
    assert outs[0] == outs[1] and outs[0].count("Bram: ") == 3  # the greeting, then two replies


def test_a_burst_of_new_prompts_is_read_together_with_the_same_replies(pair: tuple[Model, SlotModel],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Three requests arriving at once on the slot model: one ``forward_many`` reads their prompts
    (no single-prompt ``forward``), and the replies (greedy, sampled, penalised) equal the padded
    batch's, where each prompt is read alone."""
    mask, slots = pair
    calls = {"forward": 0, "forward_many": 0}
    for name in calls:
        original = getattr(SlotModel, name)

        def counted(self, *args, _original=original, _name=name):  # type: ignore[no-untyped-def]
            calls[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(SlotModel, name, counted)
    assert _replies(slots, OPTIONS) == _replies(mask, OPTIONS)
    assert calls == {"forward": 0, "forward_many": 1}
    assert slots.free_slots == 4


def test_prompts_go_together_only_while_whole_ones_fit_the_step_budget(pair: tuple[Model, SlotModel]) -> None:
    """Budget 12 prompt tokens a step: the first two short prompts go together; the 14-token one
    after them waits for the next step and is read in chunks, alone; arrival order is kept."""
    _, slots = pair
    scheduler = Scheduler(slots, SchedulerConfig(max_batch=4, prefill_chunk=12, prefix_cache_bytes=0))
    short = [make_request(slots, f"s{i}", [5 + i, 6, 7, 8], max_new_tokens=3) for i in range(2)]
    long = make_request(slots, "long", list(range(20, 34)), max_new_tokens=3)
    late = make_request(slots, "late", [9, 10], max_new_tokens=3)
    for request in (*short, long, late):
        assert scheduler.submit(request)
    events = scheduler.step()
    assert scheduler.counters["prefilled_together"] == 2
    assert all(r.first_token_at is not None for r in short) and long.first_token_at is None
    assert scheduler.prefilling_count == 1 and scheduler.queued_count == 1  # the long one began; "late" waits behind it
    events += run(scheduler)
    check_streams(events, [*short, long, late])
    assert scheduler.counters["prefilled_together"] == 2 and slots.free_slots == 4


def test_a_failed_group_prefill_fails_its_requests_and_frees_their_slots(pair: tuple[Model, SlotModel],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _, slots = pair

    def broken(self, pieces):  # type: ignore[no-untyped-def]
        raise RuntimeError("device lost")

    monkeypatch.setattr(SlotModel, "forward_many", broken)
    scheduler = Scheduler(slots, SchedulerConfig(max_batch=3, prefix_cache_bytes=0))
    requests = _requests(slots)
    assert all(scheduler.submit(r) for r in requests)
    events = run(scheduler)
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert len(errors) == 3 and all("device lost" in e.message for e in errors)
    assert scheduler.counters["failed"] == 3 and slots.free_slots == 4 and not scheduler.has_work


def test_a_prompt_too_large_for_its_slot_fails_alone(pair: tuple[Model, SlotModel]) -> None:
    """A request the server's size check would have refused reaches the scheduler anyway: it is not
    read with the prompts before it, so only it fails; the others are read together and answered."""
    _, slots = pair
    scheduler = Scheduler(slots, SchedulerConfig(max_batch=3, prefill_chunk=4096, prefix_cache_bytes=0))
    good = [make_request(slots, f"g{i}", [5 + i, 6, 7], max_new_tokens=3) for i in range(2)]
    huge = make_request(slots, "huge", [5] * 130, max_new_tokens=3)  # slots hold 128 tokens
    for request in (*good, huge):
        assert scheduler.submit(request)
    events = run(scheduler)
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert [e.request for e in errors] == [huge]
    assert all(r.finish_reason == "length" for r in good) and scheduler.counters["prefilled_together"] == 2
    assert slots.free_slots == 4
