"""Sampling from each row's top candidates: the same tokens as from the full logits, or a clear "cannot"."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from test_scheduler import check_streams, run

from npctalk.engine.model import Model
from npctalk.engine.request import Request, RequestKey
from npctalk.engine.sampling import CHAT_DEFAULTS, Sampler, SearchOptions
from npctalk.engine.scheduler import Scheduler, SchedulerConfig
from npctalk.engine.slot_model import SlotModel
from npctalk.engine.sampling import add_bonus
from npctalk.engine import topk
from npctalk.engine.topk import TopK, host_topk

VOCAB = 5000
K = 64


def _logits(rng: np.random.Generator, rows: int = 1) -> np.ndarray:
    """Peaked like a language model's: a few likely tokens over a long flat tail, (rows, VOCAB) float32."""
    base = rng.standard_normal((rows, VOCAB)).astype(np.float32) * 2
    hot = rng.integers(0, VOCAB, (rows, 30))
    for r in range(rows):
        base[r, hot[r]] += rng.uniform(4, 10, 30).astype(np.float32)
    return base


def test_topk_returns_the_k_largest_of_each_row() -> None:
    logits = _logits(np.random.default_rng(0), rows=5)
    ids, values = TopK(K).of_array(logits)
    assert ids.shape == values.shape == (5, K)
    for r in range(5):
        assert set(ids[r].tolist()) == set(np.argsort(-logits[r])[:K].tolist())
        np.testing.assert_array_equal(values[r], logits[r, ids[r]])


def test_topk_of_a_vocabulary_smaller_than_k_gives_every_token() -> None:
    logits = np.arange(12, dtype=np.float32).reshape(2, 6)
    ids, values = TopK(K).of_array(logits)
    assert ids.tolist() == [list(range(6))] * 2
    np.testing.assert_array_equal(values, logits)


OPTIONS = {
    "chat defaults": CHAT_DEFAULTS,
    "greedy": SearchOptions(),
    "greedy, penalties": SearchOptions(repetition_penalty=1.3, no_repeat_ngram_size=2),
    "hot, narrow top-k": SearchOptions(do_sample=True, temperature=1.5, top_k=8, top_p=1.0),
    "cold, tight top-p": SearchOptions(do_sample=True, temperature=0.3, top_k=50, top_p=0.5, repetition_penalty=1.1),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_pick_draws_the_token_the_full_row_draws(name: str) -> None:
    """Two samplers of one seed decode 200 steps, one from the full rows and one from the top 64
    (full rows where ``pick`` says it cannot tell): every token is the same, and most come from the
    candidates. Histories repeat likely tokens so penalties and n-gram bans hit candidates; some
    steps add a steering bonus inside and outside the candidates."""
    options = dataclasses.replace(OPTIONS[name], seed=11)
    full, top = Sampler(options), Sampler(options)
    rng = np.random.default_rng(1)
    history = list(rng.integers(0, VOCAB, 40))
    topk, decided = TopK(K), 0
    for step in range(200):
        logits = _logits(rng)
        if step % 3 == 0:  # history takes some of this row's likely tokens
            history += np.argsort(-logits[0])[: rng.integers(1, 6)].tolist()
        bonus = {int(rng.integers(0, VOCAB)): 8.0, int(np.argmax(logits[0])): -8.0} if step % 5 == 0 else {}
        steered = add_bonus(logits, bonus)
        expected = int(full.next_tokens(steered, [history])[0])
        ids, values = topk.of_array(logits)
        picked = top.pick(ids[0], values[0], history, bonus)
        if picked is None:
            picked = int(top.next_tokens(steered, [history])[0])
        else:
            decided += 1
        assert picked == expected, f"step {step}"
        history.append(expected)
    assert decided >= 150, f"only {decided} of 200 steps decided from the candidates"


def test_pick_declines_when_penalties_push_the_pick_outside_the_candidates() -> None:
    """Every candidate already said and heavily penalised: the full row's argmax is an outside
    token, and ``pick`` must say it cannot tell rather than answer from the candidates."""
    logits = _logits(np.random.default_rng(2))
    ids, values = TopK(K).of_array(logits)
    options = SearchOptions(repetition_penalty=50.0)
    history = ids[0].tolist()
    expected = int(Sampler(options).next_tokens(logits, [history])[0])
    assert expected not in set(history)
    assert Sampler(options).pick(ids[0], values[0], history) is None


def test_pick_declines_when_a_bonus_may_lift_an_outside_token() -> None:
    logits = _logits(np.random.default_rng(3))
    ids, values = TopK(K).of_array(logits)
    outside = int(np.argsort(-logits[0])[K + 10])
    bonus = {outside: 40.0}
    assert int(Sampler(SearchOptions()).next_tokens(add_bonus(logits, bonus), [[]])[0]) == outside
    assert Sampler(SearchOptions()).pick(ids[0], values[0], [], bonus) is None


def test_pick_declines_without_top_k_and_draws_nothing() -> None:
    """top-k off means top-p over the whole vocabulary: no candidate set can decide it, and the
    declined call must not consume the generator (the full-row call that follows draws as usual)."""
    logits = _logits(np.random.default_rng(4))
    ids, values = TopK(K).of_array(logits)
    options = SearchOptions(do_sample=True, top_k=0, top_p=0.9, seed=5)
    a, b = Sampler(options), Sampler(options)
    assert a.pick(ids[0], values[0], []) is None
    assert a.next_tokens(logits, [[]]).tolist() == b.next_tokens(logits, [[]]).tolist()


def _scheduled(model: Model | SlotModel, top_tokens: int) -> tuple[list[list[int]], dict[str, int]]:
    """Three sampled replies with penalties (chat defaults, a fixed seed each), decoded together."""
    scheduler = Scheduler(model, SchedulerConfig(max_batch=3, prefix_cache_bytes=0, top_tokens=top_tokens))
    texts = ["Hello traveller", "The blacksmith forges swords all day long.", "Any news from the mill?"]
    requests = [Request(RequestKey(b"c", str(i)), model.tokenizer.encode(t),
                        dataclasses.replace(CHAT_DEFAULTS, max_new_tokens=40, seed=i), model.tokenizer,
                        frozenset(model.manifest.eos_token_ids), model.manifest.max_context)
                for i, t in enumerate(texts)]
    assert all(scheduler.submit(r) for r in requests)
    check_streams(run(scheduler), requests)
    return [r.tokens for r in requests], scheduler.stats()["sampled"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_scheduler_samples_from_candidates_with_the_full_rows_replies(family: str,
                                                                          request: pytest.FixtureRequest,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Padded batch (host logits) and slot decoder (device logits): the same replies with
    candidates on and off, and with them on, the decode steps' tokens come from the candidates
    (allowed for the tiny models' 1,000-token vocabulary, which would otherwise be taken whole)."""
    monkeypatch.setattr(topk, "MIN_VOCAB", 0)
    bundle: Path = request.getfixturevalue(f"{family}_bundle")
    slots_bundle: Path = request.getfixturevalue(f"{family}_slots_bundle")
    for model in (Model(bundle, provider="cpu", intra_op_threads=1),
                  SlotModel.open(slots_bundle, 4, 128, provider="cpu", intra_op_threads=1)):
        off, off_counts = _scheduled(model, 0)
        on, on_counts = _scheduled(model, K)
        assert on == off
        assert off_counts["from_top"] == 0 and off_counts["from_full"] > 0
        assert on_counts["from_top"] > 0.8 * (on_counts["from_top"] + on_counts["from_full"])


def test_host_topk_is_shared_per_k() -> None:
    assert host_topk(K) is host_topk(K)
    assert host_topk(8).k == 8


def test_the_generator_picks_from_candidates_with_the_full_rows_tokens(gpt2_bundle: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A sampled reply with penalties and fact steering: the same tokens when every pick is forced
    through the whole row (``pick`` declining), and most picks are taken from the candidates (a
    wide top of 64, and no vocabulary too small for candidates: the tiny model has 1,000 tokens)."""
    from npctalk.engine import sampling
    from npctalk.engine.generator import Generator, GeneratorParams
    from npctalk.engine.steering import FactSteering

    monkeypatch.setattr(sampling, "WIDE_TOP", 64)
    monkeypatch.setattr(topk, "MIN_VOCAB", 0)  # the tiny model's vocabulary would be taken whole

    model = Model(gpt2_bundle, provider="cpu", intra_op_threads=1)
    prompt = model.tokenizer.encode("The smith said hello to the traveller")
    steering = FactSteering((((int(prompt[1]),),),), (((int(prompt[1]),),),), ("smith",), 6.0, model.tokenizer,
                            {int(prompt[2]): -6.0})

    def reply() -> list[int]:
        generator = Generator(model, GeneratorParams(model, dataclasses.replace(CHAT_DEFAULTS, max_new_tokens=40, seed=7)))
        generator.set_steering(steering)
        generator.append_tokens(prompt)
        while not generator.is_done():
            generator.generate_next_token()
        return generator.reply_tokens

    original = Sampler.pick
    counts = {"top": 0}

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        token = original(self, *args, **kwargs)
        counts["top"] += token is not None
        return token

    monkeypatch.setattr(Sampler, "pick", counted)
    with_candidates = reply()
    monkeypatch.setattr(Sampler, "pick", lambda self, *args, **kwargs: None)
    assert reply() == with_candidates
    assert counts["top"] > 0.8 * len(with_candidates)


def test_next_token_from_a_whole_row_equals_next_tokens_of_the_bonused_row() -> None:
    """``Sampler.next_token`` goes by way of the row's wide top and the bonus tokens' own logits:
    the same tokens as ``next_tokens`` on the bonused row, also with bonuses far outside the top
    and penalties that push every candidate down (then it falls back to the whole row)."""
    rng = np.random.default_rng(6)
    for options in (dataclasses.replace(CHAT_DEFAULTS, seed=2), SearchOptions(repetition_penalty=3.0),
                    dataclasses.replace(CHAT_DEFAULTS, repetition_penalty=3.0, seed=3),
                    SearchOptions(do_sample=True, top_k=0, top_p=0.8, seed=4)):
        full, wide = Sampler(options), Sampler(options)
        history = list(rng.integers(0, VOCAB, 30))
        for step in range(120):
            logits = _logits(rng)
            order = np.argsort(-logits[0])
            bonus = {int(order[300 + step]): 12.0, int(order[0]): -8.0} if step % 2 else {}
            if step % 7 == 0:  # the wide top (256) already said: penalised below the tokens after it
                history += order[:256].tolist()
            expected = int(full.next_tokens(add_bonus(logits, bonus), [history])[0])
            assert wide.next_token(logits, history, bonus) == expected, f"{options} step {step}"
            history.append(expected)


def test_row_of_a_device_value_is_that_row() -> None:
    import onnxruntime as ort

    logits = _logits(np.random.default_rng(7), rows=4).reshape(4, 1, VOCAB)
    value = ort.OrtValue.ortvalue_from_numpy(logits)
    for gather in (True, False):  # the Gather graph a GPU uses, and the host slice
        row = TopK(K, gather=gather).row_of_value(value, 2, VOCAB)
        np.testing.assert_array_equal(row, logits[2].reshape(1, VOCAB))


def test_bonus_tokens_joining_the_candidates_do_not_lower_the_floor() -> None:
    """A bonus token far below the wide top joins the candidates with its own logit, but tokens
    between it and the top are still unseen: with the top 256 penalised hard, the argmax is the
    257th token, which only the whole row shows."""
    perm = np.random.default_rng(8).permutation(VOCAB)
    logits = np.empty((1, VOCAB), dtype=np.float32)
    logits[0, perm] = 10 - np.arange(VOCAB, dtype=np.float32) * 0.01  # perm[i] has the i-th largest logit
    history = perm[:256].tolist()
    bonus = {int(perm[1000]): 0.5}
    options = SearchOptions(repetition_penalty=3.0)
    assert int(Sampler(options).next_tokens(add_bonus(logits, bonus), [history])[0]) == perm[256]
    assert Sampler(options).next_token(logits, history, bonus) == perm[256]


def test_a_small_vocabulary_is_sampled_whole(gpt2_bundle: Path) -> None:
    """The tiny model's 1,000 tokens are under ``MIN_VOCAB``: decode steps bring whole rows, none
    from candidates, with top tokens on."""
    _, counts = _scheduled(Model(gpt2_bundle, provider="cpu", intra_op_threads=1), K)
    assert counts["from_top"] == 0 and counts["from_full"] > 0


def test_a_bonus_is_added_before_the_top_k_on_the_device() -> None:
    """``Bonus``: the candidates are the top k of the bonused logits, with the bonused values (the
    same float32 sums as ``add_bonus``); -inf bans, padding, host arrays and device values alike."""
    rng = np.random.default_rng(8)
    logits = _logits(rng, 3)
    outside = int(np.argsort(-logits[0])[K + 20])
    best = int(np.argmax(logits[2]))
    bonuses = [{outside: 30.0, 7: 0.5}, {}, {best: float("-inf")}]
    bonus = topk.Bonus.of(bonuses, 3)
    assert bonus is not None and bonus.ids.shape == (3, 2)
    assert topk.Bonus.of([{}, {}], 2) is None
    session = TopK(K)
    value = __import__("onnxruntime").OrtValue.ortvalue_from_numpy(logits[:, None, :].copy())
    for ids, values in (session.of_array(logits, bonus), session.of_value(value, VOCAB, bonus)):
        for r in range(3):
            bonused = add_bonus(logits[r:r + 1], bonuses[r])[0]
            assert set(ids[r].tolist()) == set(np.argsort(-bonused)[:K].tolist())
            np.testing.assert_array_equal(values[r], bonused[ids[r]])
        assert outside in ids[0] and best not in ids[2]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_steered_token_outside_the_top_k_is_still_a_candidate(family: str, request: pytest.FixtureRequest,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A word's second token gets twice the bias (60 logits) in a decode step: far outside the raw
    top 8. With the bonus added before the top k, every decode step is decided from the candidates
    (none from a whole row), the steered word is said, and the replies equal whole-row decoding."""
    from npctalk.engine.steering import FactSteering

    monkeypatch.setattr(topk, "MIN_VOCAB", 0)
    bundle: Path = request.getfixturevalue(f"{family}_bundle")
    slots_bundle: Path = request.getfixturevalue(f"{family}_slots_bundle")
    for model in (Model(bundle, provider="cpu", intra_op_threads=1),
                  SlotModel.open(slots_bundle, 4, 128, provider="cpu", intra_op_threads=1)):
        tok = model.tokenizer
        word = (tok.encode(" the")[0], tok.encode(" mill")[0])

        def replies(top_tokens: int) -> tuple[list[list[int]], dict[str, int]]:
            scheduler = Scheduler(model, SchedulerConfig(max_batch=2, prefix_cache_bytes=0, top_tokens=top_tokens))
            steering = FactSteering(((word,),), ((word,),), ("themill",), 30.0, tok)
            requests = [Request(RequestKey(b"c", str(i)), tok.encode(text), SearchOptions(max_new_tokens=8), tok,
                                frozenset(model.manifest.eos_token_ids), model.manifest.max_context, steering=steering)
                        for i, text in enumerate(["Hello traveller", "Any news?"])]
            assert all(scheduler.submit(r) for r in requests)
            check_streams(run(scheduler), requests)
            return [r.tokens[len(r.prompt_ids):] for r in requests], scheduler.stats()["sampled"]

        on, counts = replies(8)
        off, _ = replies(0)
        assert on == off
        assert all(reply[:2] == list(word) for reply in on), on
        assert counts["from_full"] == 0 and counts["from_top"] >= 2, counts
