"""Perplexity of a bundle on a text: how much a quantized graph lost against its fp32 original.

``perplexity(model, text)`` tokenizes ``text`` (special tokens off), then scores every token after
the first exactly once with a sliding window (W = window <= max_context, S = stride < W)::

    targets   [1, 1 + S), [1 + S, 1 + 2S), …          S tokens scored per window
    window    the W tokens ending with the targets    [max(0, end - W), end)

so every token at position t has min(t, W - S) or more tokens of context, and none is scored twice.

Each window is one prefill from an empty KV cache; the graph's logits for every position
(seq, vocab) give ``log p(token[t] | token[begin:t])``. A lean graph returns the last position only:
then the window's context is prefilled and its targets are scored one decode step each. Perplexity = exp(mean negative log
likelihood) over the scored tokens (natural log). Torch-free: it needs only the engine's ``Model``.

Cost: about ``tokens / S`` prefills of ``W`` tokens, and ``W × vocab × 4`` bytes of logits at once
(1024 × 49152 floats = 200 MB for SmolLM2). Not thread-safe per ``Model`` cache; the model may be shared.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, GenerationError
from .model import Model

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 1024  # tokens; capped at the model's max_context
DEFAULT_STRIDE = 512   # tokens


@dataclass(frozen=True)
class PerplexityResult:
    """``perplexity`` = exp(``mean_nll``); ``mean_nll`` in nats per token over ``tokens_scored`` tokens."""

    perplexity: float
    mean_nll: float
    tokens_scored: int
    tokens: int
    windows: int
    window: int
    stride: int


def perplexity(model: Model, text: str, *, window: int | None = None, stride: int = DEFAULT_STRIDE) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (tokenized without special tokens); see the module docstring."""
    ids = model.tokenizer.encode(text)
    return perplexity_of_ids(model, ids, window=window, stride=stride)


def perplexity_of_ids(model: Model, ids: list[int] | np.ndarray, *, window: int | None = None,
                      stride: int = DEFAULT_STRIDE) -> PerplexityResult:
    """Perplexity of ``model`` on the token ids ``ids`` (at least 2 of them)."""
    tokens = np.asarray(ids, dtype=np.int64).reshape(-1)  # (n,)
    n = int(tokens.size)
    max_context = model.manifest.max_context
    window = min(DEFAULT_WINDOW, max_context) if window is None else window
    if not 2 <= window <= max_context:
        raise ConfigError(f"window must be between 2 and the model's context of {max_context} tokens, got {window}.")
    if not 1 <= stride < window:
        raise ConfigError(f"stride must be between 1 and the window minus one ({window - 1} tokens), got {stride}.")
    if n < 2:
        raise ConfigError(f"Perplexity needs a text of at least 2 tokens; this one has {n}.")
    total_nll, scored, windows = 0.0, 0, 0
    for first in range(1, n, stride):
        end = min(first + stride, n)
        begin = max(0, end - window)  # begin < first: every target has context
        log_probs = _log_probs(model, tokens[begin:end], first - begin)  # log p(token[t] | token[begin:t]), scored t
        total_nll -= float(log_probs.sum(dtype=np.float64))
        scored += end - first
        windows += 1
        log.debug("window %d: tokens [%d, %d), scored [%d, %d)", windows, begin, end, first, end)
    mean = total_nll / scored
    return PerplexityResult(perplexity=math.exp(mean), mean_nll=mean, tokens_scored=scored, tokens=n,
                            windows=windows, window=window, stride=stride)


def _log_probs(model: Model, ids: np.ndarray, first: int) -> np.ndarray:
    """For ids (seq,): log p(ids[t] | ids[:t]) for t = first..seq-1, float64 (seq - first,)."""
    logits = _logits_predicting(model, ids, first).astype(np.float64)  # (seq - first, vocab)
    peak = logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]  # (seq - first,)
    return logits[np.arange(ids.size - first), ids[first:]] - log_norm


def _logits_predicting(model: Model, ids: np.ndarray, first: int) -> np.ndarray:
    """Logits that predict ids[first:], i.e. of positions first-1 .. seq-2: (seq - first, vocab) float32.

    A graph that returns every position's logits needs one prefill; a lean graph returns only the
    last position's, so the context ids[:first] is prefilled once and the targets are stepped one
    token at a time over the KV cache (same numbers, ``seq - first`` forwards).
    """
    logits = _all_logits(model, ids)  # (seq, vocab), or (1, vocab) for a last-position graph
    if logits.shape[0] == ids.size:
        return logits[first - 1:-1]
    cache = model.new_cache(batch_size=1)
    rows = [model.forward(ids[:first].reshape(1, first), cache)[0]]  # predicts ids[first]
    for t in range(first, ids.size - 1):
        rows.append(model.forward(ids[t:t + 1].reshape(1, 1), cache)[0])  # predicts ids[t + 1]
    return np.stack(rows)


def _all_logits(model: Model, ids: np.ndarray) -> np.ndarray:
    """One prefill of ids (seq,) from an empty cache; logits of every position the graph returns:
    (seq, vocab) float32, or (1, vocab) for a graph that returns the last position only (``--graph lean``).

    ``Model.forward`` keeps only the last position (all sampling needs); this feeds the same graph
    inputs and keeps them all.
    """
    io, seq = model.io, ids.size
    if ids.min() < 0 or ids.max() >= model.manifest.vocab_size:
        raise GenerationError(f"Token ids must be in [0, {model.manifest.vocab_size}), got {ids.min()}..{ids.max()}.")
    cache = model.new_cache(batch_size=1)  # empty: each (1, kv_heads, 0, head_dim)
    feed: dict[str, np.ndarray] = {io.input_ids: ids.reshape(1, seq).astype(io.id_dtype)}
    if io.attention_mask:
        feed[io.attention_mask] = np.ones((1, seq), dtype=io.id_dtype)
    if io.position_ids:
        feed[io.position_ids] = np.arange(seq, dtype=io.id_dtype).reshape(1, seq)
    feed.update(zip(io.past_keys, cache.keys))
    feed.update(zip(io.past_values, cache.values))
    (logits,) = model.session.run([io.logits], feed)  # (1, seq, vocab)
    return np.asarray(logits[0], dtype=np.float32)
