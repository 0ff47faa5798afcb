"""Picking many rows' tokens from their top candidates at once: the same tokens and draws as each
row's whole logits row, and a declined row draws nothing."""

from __future__ import annotations

import dataclasses

import numpy as np
from test_topk import OPTIONS, VOCAB, _logits

from npctalk.engine.pick import pick_many, pick_rows, processing_key
from npctalk.engine.sampling import CHAT_DEFAULTS, HistoryIndex, Sampler, SearchOptions, add_bonus, draw, nucleus
from npctalk.engine.topk import TopK

K = 64


def test_rows_picked_together_draw_what_each_whole_row_draws() -> None:
    """24 rows of mixed options (every set of test_topk's, so several groups), each its own seed and
    history, 60 steps: ``pick_many`` (whole rows where it declines) gives every row the token its
    own sampler draws from its whole bonused row, and the candidates decide most of them."""
    rows, rng = 24, np.random.default_rng(7)
    options = [dataclasses.replace(list(OPTIONS.values())[r % len(OPTIONS)], seed=100 + r) for r in range(rows)]
    assert len({processing_key(o) for o in options}) == len(OPTIONS)
    full = [Sampler(o) for o in options]
    top = [Sampler(o) for o in options]
    histories = [list(rng.integers(0, VOCAB, 30)) for _ in range(rows)]
    topk, decided = TopK(K), 0
    for step in range(60):
        logits = _logits(rng, rows)
        for r in range(rows):
            if (step + r) % 3 == 0:  # histories take some of their row's likely tokens
                histories[r] += np.argsort(-logits[r])[: rng.integers(1, 6)].tolist()
        bonuses = [{int(rng.integers(0, VOCAB)): 8.0, int(np.argmax(logits[r])): -8.0} if (step + r) % 5 == 0 else {}
                   for r in range(rows)]
        expected = [int(full[r].next_tokens(add_bonus(logits[r:r + 1], bonuses[r]), [histories[r]])[0])
                    for r in range(rows)]
        ids, values = topk.of_array(logits)
        picked = pick_many(top, ids, values, histories, bonuses)
        decided += sum(t is not None for t in picked)
        got = [t if t is not None else int(top[r].next_tokens(add_bonus(logits[r:r + 1], bonuses[r]), [histories[r]])[0])
               for r, t in enumerate(picked)]
        assert got == expected, f"step {step}"
        for r in range(rows):
            histories[r].append(expected[r])
    assert decided >= 0.75 * rows * 60, f"only {decided} of {rows * 60} decided from the candidates"


def test_a_declined_row_draws_nothing_while_the_others_draw() -> None:
    """Row 1 said all its candidates and penalises them hard, so its pick lies outside them: it is
    declined and its generator untouched; rows 0 and 2 are drawn as alone."""
    rng = np.random.default_rng(3)
    logits = _logits(rng, 3)
    ids, values = TopK(K).of_array(logits)
    options = dataclasses.replace(CHAT_DEFAULTS, repetition_penalty=50.0, no_repeat_ngram_size=0)
    samplers = [Sampler(dataclasses.replace(options, seed=s)) for s in range(3)]
    histories = [[], ids[1].tolist(), []]
    picked = pick_rows(samplers, ids, values, histories, [{}, {}, {}])
    assert picked[1] is None and picked[0] is not None and picked[2] is not None
    untouched = Sampler(dataclasses.replace(options, seed=1))
    assert samplers[1].rng.random() == untouched.rng.random()
    for r in (0, 2):
        alone = Sampler(dataclasses.replace(options, seed=r))
        assert alone.pick(ids[r], values[r], histories[r]) == picked[r]


def test_nucleus_and_draw_ignore_banned_entries_between_and_after() -> None:
    """A row's top-p mask and drawn token are the same whether its allowed entries stand alone or
    spread among -inf entries (as a row's candidates are among the others' in a batch)."""
    rng = np.random.default_rng(5)
    for trial in range(200):
        n = int(rng.integers(1, 60))
        compact = (rng.standard_normal(n) * rng.uniform(0.1, 4)).astype(np.float32)
        compact[rng.random(n) < 0.1] = compact[0]  # ties
        spread = np.full(n + int(rng.integers(0, 40)), -np.inf, dtype=np.float32)
        where = np.sort(rng.choice(spread.size, n, replace=False))
        spread[where] = compact
        p = float(rng.uniform(0.05, 1.0))
        np.testing.assert_array_equal(nucleus(spread[None], p)[0][where], nucleus(compact[None], p)[0])
        assert not nucleus(spread[None], p)[0][np.setdiff1d(np.arange(spread.size), where)].any()
        a, b = np.random.default_rng(trial), np.random.default_rng(trial)
        assert where[draw(compact[None], [a])[0]] == draw(spread[None], [b])[0]


def test_history_index_seen_of_follows_appends_and_rewinds() -> None:
    index = HistoryIndex(3)
    history = [5, 70_000, 9]
    index.sync(history)
    ids = np.array([[5, 9, 70_000, 70_001, 0]])
    assert index.seen_of(ids).tolist() == [[True, True, True, False, False]]
    index.sync([5, 2])  # not an extension: a rewind, indexed again
    assert index.seen_of(ids).tolist() == [[True, False, False, False, False]]


def test_options_that_process_alike_share_a_group_whatever_their_seed() -> None:
    a = SearchOptions(do_sample=True, top_k=40, seed=1, max_new_tokens=5)
    assert processing_key(a) == processing_key(dataclasses.replace(a, seed=2, max_new_tokens=50))
    assert processing_key(a) != processing_key(dataclasses.replace(a, top_p=0.9))
    assert processing_key(SearchOptions(temperature=0.3)) == processing_key(SearchOptions(temperature=0.9))  # greedy
