"""Decode steps launched ahead on a worker thread (``decode_step``), through the scheduler."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from test_scheduler import FIRST, CountingModel, check_streams, make_request, run

from npctalk.engine.kv_cache import KVCache
from npctalk.engine.model import Model
from npctalk.engine.scheduler import Scheduler, SchedulerConfig
from npctalk.engine.tokenizer import Tokenizer


class GatedModel(CountingModel):
    """A CountingModel whose decode steps (one token after a cached prompt) wait for ``gate`` and
    record the thread they ran on."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)

        self.gate = threading.Event()
        self.threads: list[str] = []
        self.waiting = threading.Event()

    def forward(self, input_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        if input_ids.shape[1] == 1 and cache.length > 0:  # a decode step, not a prompt
            self.threads.append(threading.current_thread().name)
            self.waiting.set()
            assert self.gate.wait(10), "the test never opened the gate"
        return super().forward(input_ids, cache)


def test_decode_ahead_returns_the_tokens_while_the_next_step_runs(byte_tokenizer: Tokenizer) -> None:
    """With ``decode_ahead`` a step returns its events while the decode step it launched is still
    running on the worker thread (here: held at a gate), and the next step joins it."""
    model = GatedModel(byte_tokenizer)
    scheduler = Scheduler(model, SchedulerConfig(decode_ahead=True))
    request = make_request(model, "r", [FIRST, FIRST + 1], max_new_tokens=3)
    scheduler.submit(request)
    events = scheduler.step()  # prompt, first token, decode step launched
    assert model.waiting.wait(10)  # the launched step is running and blocked ...
    assert request.completion_tokens == 1 and scheduler.has_work  # ... and the step returned without it
    model.gate.set()
    events += run(scheduler)
    check_streams(events, [request])
    assert request.completion_tokens == 3 and set(model.threads) == {"npctalk-decode_0"}


@pytest.mark.parametrize("options", [dict(max_new_tokens=30), dict(max_new_tokens=30, stop_strings=["h"]),
                                     dict(max_new_tokens=30, do_sample=True, temperature=0.9, seed=3,
                                          repetition_penalty=1.2, no_repeat_ngram_size=2)])
def test_decode_ahead_gives_the_replies_of_the_plain_loop(gpt2_model: Model, options: dict[str, object]) -> None:
    """Same tokens, text and finish reasons with and without ``decode_ahead``: greedy, a stop string
    found only when a token becomes text (the step launched past it is dropped), sampling with
    penalties; one stream cancelled mid-reply and one joining late."""
    replies = []
    for ahead in (True, False):
        scheduler = Scheduler(gpt2_model, SchedulerConfig(max_batch=4, decode_ahead=ahead, prefix_cache_bytes=0))
        requests = [make_request(gpt2_model, str(i), gpt2_model.tokenizer.encode(text), **options)
                    for i, text in enumerate(["Hello there", "The smith works iron", "Dragons fly", "Late one"])]
        for r in requests[:3]:
            scheduler.submit(r)
        events = scheduler.step() + scheduler.step() + scheduler.step()
        scheduler.cancel(requests[2].key)
        scheduler.submit(requests[3])
        events += run(scheduler)
        check_streams(events, requests)
        replies.append([(r.tokens, r.text, r.finish_reason) for r in requests])
        assert requests[2].finish_reason == "cancelled"
    (ahead_cancelled, plain_cancelled) = (replies[0].pop(2), replies[1].pop(2))
    assert replies[0] == replies[1]
    # The cancel lands within one step either way; ahead, one token fewer may have been taken.
    shorter, longer = sorted((ahead_cancelled[0], plain_cancelled[0]), key=len)
    assert longer[:len(shorter)] == shorter and len(longer) - len(shorter) <= 1


def test_with_decode_ahead_every_run_of_the_decoder_is_on_the_worker(llama_slots_bundle: Path) -> None:
    """ONNX Runtime lets a session replaying CUDA graphs be run from one thread only: with
    ``decode_ahead`` the prompt reads (alone, from a persona snapshot, and together), the decode steps
    and a reranked say's scoring all run on the decode worker, and the replies are the plain loop's."""
    from npctalk.engine.decode_step import WORKER_NAME
    from npctalk.engine.request import Request, RequestKey
    from npctalk.engine.sampling import SearchOptions
    from npctalk.engine.slot_model import SlotModel

    replies = []
    for ahead in (False, True):
        model = SlotModel.open(llama_slots_bundle, 8, 256, provider="cpu", intra_op_threads=1)
        session, threads = model.decoder.session, []

        class Recording:
            def __getattr__(self, name: str) -> object:
                return getattr(session, name)

            def run_with_iobinding(self, *args: object) -> None:
                threads.append(threading.current_thread().name)
                session.run_with_iobinding(*args)

        model.decoder.session = Recording()
        scheduler = Scheduler(model, SchedulerConfig(max_batch=6, prefill_chunk=4096, decode_ahead=ahead))
        prefix = [5, 6, 7, 8, 9, 10, 11, 12]

        def say(rid: str, turn: list[int]) -> Request:
            return Request(RequestKey(b"c", rid), prefix + turn, SearchOptions(max_new_tokens=6), model.tokenizer,
                           frozenset(model.manifest.eos_token_ids), 256, received_at=0.0)

        first = [say("a", [20, 21]), say("b", [22, 23, 24])]  # cold: read together, the prefix kept
        for request in first:
            assert scheduler.submit(request, ("npc", len(prefix)))
        events = run(scheduler)
        later = say("c", [25])  # warm: its turn alone after the snapshot
        scored: list[str] = []

        def scorer(texts: list[str]) -> list[float]:
            scored.append(threading.current_thread().name)
            return [0.0] * len(texts)

        parent = say("d", [26])
        candidates = [say(f"d{i}", [26]) for i in range(2)]
        assert scheduler.submit(later, ("npc", len(prefix)))
        assert scheduler.submit_reranked(parent, candidates, scorer, ("npc", len(prefix)))
        events += run(scheduler)
        check_streams(events, [*first, later, parent])
        replies.append([r.tokens for r in (*first, later, parent)])
        assert scheduler.counters["prefilled_together"] >= 2 and scorer and scored
        on_worker = {name.startswith(WORKER_NAME) for name in [*threads, *scored]}
        assert on_worker == ({True} if ahead else {False}), (ahead, set(threads), scored)
    assert replies[0] == replies[1]
