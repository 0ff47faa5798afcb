"""Many rows' next tokens from each row's top candidates at once, or a clear "cannot" per row.

A decode step brings each sampled row's top logits off the device (``topk.TopTokens``: ids and raw
values, (rows, k)). Each row is then processed as ``Sampler.next_tokens`` processes a whole row —
steering's bonus, repetition penalty, n-gram ban, then temperature, top-k and top-p — and drawn
from the row's own generator. Done row by row that was about 70 µs of small numpy calls per row
(5 ms of host time per step at 64 rows, more than an H100's whole decode step); here the rows that
share processing options (``processing_key``) go through each stage together, as (rows, k) arrays,
and only what is truly per row (bonus, history, generator) is looked at row by row.

Why it is exact: a token outside the candidates has a raw logit at most the row's floor (the
smallest candidate, or the caller's ``floors``). The processors only lower it (penalty > 1, bans) or
add its known bonus. So when at least ``top_k`` candidates (1 when greedy) end above floor + the
largest outside bonus, the whole row's top-k set is among them; top-p (``sampling.nucleus``) and the
draw (``sampling.draw``) then see the same float32 values in the same token-id order, and give the
same token and the same draw, bit for bit. Otherwise the row's answer is None and its generator is
untouched (its caller picks from the whole row).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .sampling import Sampler, SearchOptions, apply_top_k, draw, nucleus

ProcessingKey = tuple[bool, float, int, float, float, int]


def processing_key(options: SearchOptions) -> ProcessingKey:
    """What rows must share to be processed together (seeds and lengths may differ)."""
    o = options
    return (o.greedy, 0.0 if o.greedy else o.temperature, o.top_k, o.top_p, o.repetition_penalty,
            o.no_repeat_ngram_size)


def pick_many(samplers: Sequence[Sampler], ids: np.ndarray, values: np.ndarray,
              histories: Sequence[Sequence[int]], bonuses: Sequence[Mapping[int, float]]) -> list[int | None]:
    """``pick_rows`` for rows of any options: grouped by ``processing_key``, in row order."""
    groups: dict[ProcessingKey, list[int]] = {}
    for row, sampler in enumerate(samplers):
        groups.setdefault(processing_key(sampler.options), []).append(row)
    out: list[int | None] = [None] * len(samplers)
    for rows in groups.values():
        picked = pick_rows([samplers[r] for r in rows], ids[rows], values[rows],
                           [histories[r] for r in rows], [bonuses[r] for r in rows])
        for row, token in zip(rows, picked):
            out[row] = token
    return out


def pick_rows(samplers: Sequence[Sampler], ids: np.ndarray, values: np.ndarray,
              histories: Sequence[Sequence[int]], bonuses: Sequence[Mapping[int, float]],
              floors: np.ndarray | None = None) -> list[int | None]:
    """Each row's next token from its candidates, or None where they cannot decide.

    ``samplers``: one per row (its generator and history index), all with one ``processing_key``.
    ``ids``, ``values``: (rows, k) distinct token ids per row with their raw logits, any order.
    ``histories``: prompt + reply per row; ``bonuses``: token → logits per row (``add_bonus``).
    ``floors``: (rows,) float32, no outside token's raw logit above it (default: each row's
    smallest value, right when the candidates are the row's top k)."""
    o = samplers[0].options
    rows, k = ids.shape
    need = 1 if o.greedy else o.top_k
    if rows == 0 or need < 1 or need >= k or o.repetition_penalty < 1.0:
        return [None] * rows  # top-k off (top-p over the whole vocabulary), or too few candidates
    order = np.argsort(ids, axis=-1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=-1)  # (rows, k) ascending, as a full row's survivors are listed
    x = np.take_along_axis(values, order, axis=-1).astype(np.float32)  # (rows, k), a copy
    bound = (x.min(axis=-1) if floors is None else np.asarray(floors, dtype=np.float32)).copy()  # (rows,)
    for row, bonus in enumerate(bonuses):
        if bonus:
            lift = _add_bonus(ids[row], x[row], bonus)
            if lift > 0:  # an outside token may rise by this much
                bound[row] = np.float32(bound[row] + lift)
    if o.repetition_penalty != 1.0 or o.no_repeat_ngram_size:
        for sampler, history in zip(samplers, histories):
            sampler.index.sync(history)
    if o.repetition_penalty != 1.0:
        largest = int(ids.max())
        seen = np.stack([s.index.seen_of(ids[row], largest) for row, s in enumerate(samplers)])  # (rows, k)
        penalised = np.where(x < 0, x * o.repetition_penalty, x / o.repetition_penalty)
        x = np.where(seen, penalised, x)
    if o.no_repeat_ngram_size:
        for row, sampler in enumerate(samplers):
            if banned := sampler.index.banned():
                x[row, np.isin(ids[row], np.fromiter(banned, dtype=np.int64, count=len(banned)))] = -np.inf
    if o.greedy:
        best = np.argmax(x, axis=-1)  # (rows,)
        top = x[np.arange(rows), best]
        return [int(ids[r, best[r]]) if top[r] > bound[r] else None for r in range(rows)]
    temperature = np.float32(o.temperature)
    x = x / temperature
    decided = np.flatnonzero(np.count_nonzero(x > (bound / temperature)[:, None], axis=-1) >= need)
    out: list[int | None] = [None] * rows
    if decided.size:
        y = apply_top_k(x[decided], o.top_k)
        if o.top_p < 1.0:
            y = np.where(nucleus(y, o.top_p), y, np.float32(-np.inf))
        at = draw(y, [samplers[r].rng for r in decided])  # one draw per decided row, none for the others
        for r, position in zip(decided.tolist(), at.tolist()):
            out[r] = int(ids[r, position])
    return out


def _add_bonus(ids: np.ndarray, x: np.ndarray, bonus: Mapping[int, float]) -> float:
    """Add ``bonus`` to the candidates ``x`` (k,) it names (``ids`` ascending), in place; the largest
    bonus of a token outside them (0 when none)."""
    keys = np.fromiter(bonus, dtype=np.int64, count=len(bonus))
    adds = np.fromiter(bonus.values(), dtype=np.float32, count=len(bonus))
    at = np.minimum(np.searchsorted(ids, keys), ids.size - 1)
    inside = ids[at] == keys
    x[at[inside]] += adds[inside]
    lift = adds[~inside]
    return float(lift.max()) if lift.size and lift.max() > 0 else 0.0
