"""Search options validation and the sampler's logits processors (numpy, no model)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from npctalk.engine.errors import ConfigError
from npctalk.engine.sampling import (
    Sampler,
    SearchOptions,
    apply_no_repeat_ngram,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    banned_ngram_tokens,
)


def softmax(logits: np.ndarray) -> np.ndarray:
    x = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def random_logits(batch: int = 4, vocab: int = 50, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((batch, vocab)) * 3).astype(np.float32)


# --- SearchOptions ------------------------------------------------------------------------------------


def test_defaults_are_valid_and_frozen() -> None:
    options = SearchOptions()
    assert options.greedy and options.stop_strings == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.temperature = 2.0  # type: ignore[misc]
    assert SearchOptions(stop_strings=["\n", "Player:"]).stop_strings == ("\n", "Player:")
    assert SearchOptions(do_sample=True, temperature=0).greedy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0), ("max_new_tokens", 2.5), ("max_new_tokens", True), ("do_sample", "yes"),
        ("temperature", -0.1), ("temperature", math.nan), ("temperature", "hot"), ("top_k", -1),
        ("top_p", 0.0), ("top_p", 1.5), ("repetition_penalty", 0.0), ("repetition_penalty", math.inf),
        ("no_repeat_ngram_size", -2), ("seed", -1), ("seed", 1.5), ("stop_strings", "\n"), ("stop_strings", [""]),
    ],
)
def test_bad_option_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"Invalid search options: .*{field}|{field} must be"):
        SearchOptions(**{field: value})


# --- processors ---------------------------------------------------------------------------------------


def test_repetition_penalty_hf_semantics() -> None:
    logits = np.array([[2.0, -2.0, 1.0, -1.0, 0.5]], dtype=np.float32)
    out = apply_repetition_penalty(logits, [[0, 1, 1]], 2.0)
    np.testing.assert_allclose(out, [[1.0, -4.0, 1.0, -1.0, 0.5]])
    probs_before, probs_after = softmax(logits)[0], softmax(out)[0]
    assert probs_after[0] < probs_before[0] and probs_after[1] < probs_before[1]
    assert apply_repetition_penalty(logits, [[0]], 1.0) is logits


@pytest.mark.parametrize(
    ("history", "n", "banned"),
    [
        ([1, 2, 3, 1, 2], 3, {3}),
        ([1, 2, 3, 1, 2, 4, 1, 2], 3, {3, 4}),
        ([5, 6, 5], 2, {6}),
        ([5, 6, 7, 5], 2, {6}),
        ([5, 6, 7], 2, set()),
        ([1, 2], 3, set()),  # too short to hold an earlier 3-gram
        ([4, 4, 9], 1, {4, 9}),
        ([1, 2, 3], 0, set()),
    ],
)
def test_no_repeat_ngram_bans_exactly_the_completing_tokens(history: list[int], n: int, banned: set[int]) -> None:
    assert set(banned_ngram_tokens(history, n).tolist()) == banned
    out = apply_no_repeat_ngram(np.zeros((1, 10), dtype=np.float32), [history], n)
    assert set(np.flatnonzero(np.isneginf(out[0])).tolist()) == banned


def test_top_k_keeps_k_per_row() -> None:
    logits = random_logits()
    out = apply_top_k(logits, 5)
    assert (np.isfinite(out).sum(axis=1) == 5).all()
    assert (out.argmax(axis=1) == logits.argmax(axis=1)).all()
    assert apply_top_k(logits, 0) is logits


@pytest.mark.parametrize(("p", "kept"), [(0.45, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (0.97, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_minimal_nucleus(p: float, kept: set[int]) -> None:
    probs = np.array([0.15, 0.5, 0.05, 0.3])  # sorted: 1 (0.5), 3 (0.3), 0 (0.15), 2 (0.05)
    by_rank = [1, 3, 0, 2]
    logits = np.log(probs)[None].astype(np.float32)
    out = apply_top_p(logits, p)
    assert set(np.flatnonzero(np.isfinite(out[0])).tolist()) == {by_rank[r] for r in kept}


def test_processors_match_transformers() -> None:
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(3)
    logits = random_logits(batch=3, vocab=40, seed=3)
    history = rng.integers(0, 8, size=(3, 30))  # small alphabet: many repeated n-grams
    ids, scores = torch.from_numpy(history), torch.from_numpy(logits.copy())
    pairs = [
        (apply_repetition_penalty(logits, history.tolist(), 1.3), RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone())),
        (apply_no_repeat_ngram(logits, history.tolist(), 2), NoRepeatNGramLogitsProcessor(2)(ids, scores.clone())),
        (apply_top_k(logits, 7), TopKLogitsWarper(7)(ids, scores.clone())),
        (apply_top_p(logits, 0.8), TopPLogitsWarper(0.8)(ids, scores.clone())),
    ]
    for ours, theirs in pairs:
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)


# --- Sampler ------------------------------------------------------------------------------------------


def test_top_k_one_is_greedy() -> None:
    sampler = Sampler(SearchOptions(do_sample=True, temperature=1.5, top_k=1, seed=1), batch_size=4)
    greedy = Sampler(SearchOptions(do_sample=False), batch_size=4)
    histories = [[]] * 4
    for seed in range(10):
        logits = random_logits(seed=seed)
        expected = logits.argmax(axis=1)
        assert (sampler.next_tokens(logits, histories) == expected).all()
        assert (greedy.next_tokens(logits, histories) == expected).all()


def test_same_seed_same_draws_different_seed_different_draws() -> None:
    def draws(seed: int) -> list[int]:
        sampler = Sampler(SearchOptions(do_sample=True, top_k=0, seed=seed))
        return [int(sampler.next_tokens(random_logits(1, 50, s) / 3, [[]])[0]) for s in range(30)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_sampling_follows_the_distribution_and_filters() -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)[None].astype(np.float32)
    sampler = Sampler(SearchOptions(do_sample=True, top_k=0, top_p=0.75, seed=0))
    picks = np.array([sampler.next_tokens(logits, [[]])[0] for _ in range(2000)])
    assert set(picks.tolist()) == {0, 1}
    assert abs((picks == 0).mean() - 0.5 / 0.8) < 0.05


def test_greedy_applies_penalties() -> None:
    logits = np.array([[3.0, 2.9, 0.0]], dtype=np.float32)
    sampler = Sampler(SearchOptions(repetition_penalty=1.5))
    assert sampler.next_tokens(logits, [[0]])[0] == 1
    sampler = Sampler(SearchOptions(no_repeat_ngram_size=2))
    assert sampler.next_tokens(logits, [[7, 0, 7]])[0] == 1


@pytest.mark.parametrize("n", [0, 1, 2, 4])
def test_history_index_follows_a_growing_history_and_a_rewind(n: int) -> None:
    """The index's seen set and n-gram bans equal those computed from scratch after every append,
    after a rewind to an earlier length, and after a rewritten history of the same length."""
    from npctalk.engine.sampling import HistoryIndex

    rng = np.random.default_rng(n)
    index, history = HistoryIndex(n), []
    for step in range(120):
        if step == 60:
            history = history[:25]  # rewound
        elif step == 90:
            history = [t + 1 for t in history]  # same length, other tokens
        else:
            history.append(int(rng.integers(0, 6)))  # a small vocabulary, so n-grams repeat
        index.sync(history)
        assert index.seen == set(history)
        assert index.banned() == set(banned_ngram_tokens(history, n).tolist())
