"""Search options and the sampler: logits of shape (batch, vocab) → next token ids (batch,).

Processing order and semantics follow Hugging Face ``generate`` so that greedy output can be compared
with it: repetition penalty, no-repeat n-gram ban, then (sampling only) temperature, top-k, top-p.
Greedy decoding (``do_sample`` False or ``temperature`` 0) takes the argmax after the first two.

Each stream owns a ``numpy.random.Generator`` seeded from ``SearchOptions.seed``: the same seed and
the same prompt give the same reply, whatever else runs beside it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError

log = logging.getLogger(__name__)

MAX_FACT_BIAS = 100.0
WIDE_TOP = 256  # candidates ``Sampler.next_token`` takes from a whole row before it falls back to all of it
NUCLEUS_SORT = 1024  # top-p sorts a row's survivors whole up to this many, else only its likeliest


@dataclass(frozen=True)
class SearchOptions:
    """How to pick each next token. Counts are tokens; ``stop_strings`` are matched on decoded text.

    ``top_k`` 0 and ``top_p`` 1.0 disable those filters; ``repetition_penalty`` 1.0 and
    ``no_repeat_ngram_size`` 0 disable those; ``seed`` None draws fresh entropy. ``fact_bias`` is the
    logit bonus of fact steering (``steering.FactSteering``: the words that state the fact a player's
    question asks about); 0 turns it off. The sampler itself does not read it: the server and
    ``ChatSession`` build the steering, which needs the persona and memory.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int | None = None
    stop_strings: tuple[str, ...] = field(default_factory=tuple)
    fact_bias: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, str) or not isinstance(self.stop_strings, (tuple, list)):
            raise ConfigError(f"stop_strings must be a list of strings, got {self.stop_strings!r}.")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        problems = [p for p in self._problems() if p]
        if problems:
            raise ConfigError("Invalid search options: " + "; ".join(problems) + ".")

    def _problems(self) -> list[str | None]:
        def integer(name: str, low: int) -> str | None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                return f"{name} must be an integer >= {low}, got {value!r}"
            return None

        def number(name: str) -> float | None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            return float(value) if ok else None

        temperature, top_p, penalty = number("temperature"), number("top_p"), number("repetition_penalty")
        bias = number("fact_bias")
        return [
            integer("max_new_tokens", 1),
            None if isinstance(self.do_sample, bool) else f"do_sample must be True or False, got {self.do_sample!r}",
            None if temperature is not None and temperature >= 0
            else f"temperature must be a number >= 0 (0 means greedy), got {self.temperature!r}",
            integer("top_k", 0),
            None if top_p is not None and 0 < top_p <= 1 else f"top_p must be in (0, 1], got {self.top_p!r}",
            None if penalty is not None and penalty > 0
            else f"repetition_penalty must be a number > 0 (1 disables it), got {self.repetition_penalty!r}",
            integer("no_repeat_ngram_size", 0),
            None if self.seed is None else integer("seed", 0),
            None if all(isinstance(s, str) and s for s in self.stop_strings)
            else f"stop_strings must be non-empty strings, got {list(self.stop_strings)!r}",
            None if bias is not None and 0 <= bias <= MAX_FACT_BIAS
            else f"fact_bias must be a number in [0, {MAX_FACT_BIAS:g}] (0 turns fact steering off), got {self.fact_bias!r}",
        ]

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax: ``do_sample`` off or ``temperature`` 0."""
        return not self.do_sample or self.temperature == 0


# --- logits processors: (batch, vocab) float32 in, same shape out; histories are per row -------------


# Conversation defaults for chat and serve: sampled, short replies, repetition held down (small
# models loop otherwise), the answer to a question about a known fact nudged towards being said
# (bench/results/consistency-*-steering-*.md: 0, 4 and 8 measured; 8 the default).
CHAT_DEFAULTS = SearchOptions(
    max_new_tokens=96, do_sample=True, temperature=0.7, top_k=40, top_p=0.9,
    repetition_penalty=1.15, no_repeat_ngram_size=4, fact_bias=8.0,
)


def apply_repetition_penalty(logits: np.ndarray, histories: Sequence[Sequence[int]], penalty: float) -> np.ndarray:
    """HF semantics: each token already seen has its logit divided by ``penalty`` if positive,
    multiplied if negative (so ``penalty`` > 1 always makes it less likely)."""
    if penalty == 1.0:
        return logits
    out = logits.copy()
    for row, history in enumerate(histories):
        seen = np.unique(np.asarray(history, dtype=np.int64))  # (n_seen,)
        if seen.size:
            scores = out[row, seen]
            out[row, seen] = np.where(scores < 0, scores * penalty, scores / penalty)
    return out


def banned_ngram_tokens(history: Sequence[int], n: int) -> np.ndarray:
    """Tokens that would complete an ``n``-gram already present in ``history`` (HF semantics)."""
    h = np.asarray(history, dtype=np.int64)
    if n <= 0 or h.size < n:  # no complete n-gram in the history yet
        return np.empty(0, dtype=np.int64)
    if n == 1:
        return np.unique(h)
    grams = np.lib.stride_tricks.sliding_window_view(h, n)  # (num_ngrams, n)
    match = (grams[:, :-1] == h[h.size - (n - 1):]).all(axis=1)  # earlier n-grams starting like our tail
    return np.unique(grams[match, -1])


def apply_no_repeat_ngram(logits: np.ndarray, histories: Sequence[Sequence[int]], n: int) -> np.ndarray:
    """Set to -inf every token that would repeat an ``n``-gram of its row's history."""
    if n <= 0:
        return logits
    out = logits.copy()
    for row, history in enumerate(histories):
        out[row, banned_ngram_tokens(history, n)] = -np.inf
    return out


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` largest logits of each row (ties at the cut-off kept too); 0 disables."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]  # (batch, 1)
    return np.where(logits < kth, -np.inf, logits)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep each row's smallest set of most likely tokens whose probabilities sum to >= ``p``."""
    if p >= 1.0:
        return logits
    out = np.full_like(logits, -np.inf)
    for row in range(logits.shape[0]):
        allowed = np.flatnonzero(np.isfinite(logits[row]))  # (n,): after top-k only k tokens
        values = logits[row, allowed]  # (n,)
        keep = allowed[nucleus(values[None], p)[0] if allowed.size <= NUCLEUS_SORT else _wide_nucleus(values, p)]
        out[row, keep] = logits[row, keep]
    return out


def nucleus(x: np.ndarray, p: float) -> np.ndarray:
    """Top-p of processed logits (rows, n), -inf where banned: a bool mask (rows, n) of each row's
    smallest set of most likely entries whose probabilities sum to >= ``p``.

    Row by row the result depends only on the finite entries and their order, not on how many -inf
    entries lie between or after them (the totals are sequential sums, to which a 0 adds exactly
    nothing; the sort is stable). So a row's top candidates with the others -inf (``pick``) and the
    same tokens taken out of the whole row give the same mask, bit for bit."""
    e = _weights(x)  # (rows, n)
    probs = e / np.cumsum(e, axis=-1)[:, -1:]
    order = np.argsort(-probs, axis=-1, kind="stable")  # most likely first; ties in position order
    ranked = np.take_along_axis(probs, order, axis=-1)
    keep = np.empty(x.shape, dtype=bool)
    np.put_along_axis(keep, order, np.cumsum(ranked, axis=-1) - ranked < p, axis=-1)  # mass before each < p
    return keep & np.isfinite(x)


def _wide_nucleus(values: np.ndarray, p: float) -> np.ndarray:
    """``nucleus`` of one row of many survivors (n,) (top-k off): sorting 50k tokens costs
    milliseconds, so only the m most likely are sorted, m grown until they hold mass >= p."""
    e = _weights(values[None])[0]
    probs = e / np.cumsum(e)[-1]
    m = min(64, values.size)
    while True:
        top = np.argpartition(-probs, m - 1)[:m] if m < values.size else np.arange(values.size)
        if m == values.size or probs[top].sum() >= p:
            break
        m = min(4 * m, values.size)
    order = top[np.argsort(-probs[top], kind="stable")]  # (m,), most likely first
    before = np.cumsum(probs[order]) - probs[order]  # mass of more likely tokens; 0 for the top one
    keep = np.zeros(values.size, dtype=bool)
    keep[order[before < p]] = True
    return keep


def draw(x: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """Per row of processed logits (rows, n), -inf where banned: the position of an entry drawn
    with its softmax probability, by one ``random()`` of the row's generator; int64 (rows,).

    Inverse CDF over the unnormalised weights: the first entry whose running total exceeds the
    draw times the row's total. As for ``nucleus``, -inf entries between or after the finite ones
    change nothing (their weight is 0, so no running total first exceeds the draw there)."""
    e = _weights(x)
    cdf = np.cumsum(e, axis=-1)  # (rows, n)
    target = np.fromiter((rng.random() for rng in rngs), dtype=np.float64, count=len(rngs)) * cdf[:, -1]
    index = np.count_nonzero(cdf <= target[:, None], axis=-1)
    last = x.shape[-1] - 1 - np.argmax(np.isfinite(x[:, ::-1]), axis=-1)  # the last finite entry
    return np.minimum(index, last)


def _weights(x: np.ndarray) -> np.ndarray:
    """exp(x - row max) in float64 (rows, n); 0 where x is -inf."""
    x = x.astype(np.float64)
    return np.exp(x - x.max(axis=-1, keepdims=True))


class HistoryIndex:
    """What the processors ask of one growing history, kept up to date as tokens are appended: the
    set of tokens seen, and each (n-1)-gram's next tokens (the n-gram ban). ``sync`` follows the
    caller's history list; when it is not an extension of what was indexed (a rewind), it starts
    again. Costs O(new tokens) per call instead of O(history): the list ``sync`` saw last is taken
    to have grown by appends only, so a history cut or changed in place must come as a new list
    (``Generator.rewind_to`` makes one); any other list is compared with what was indexed."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._reset()

    def _reset(self) -> None:
        self._source: list[int] | None = None  # the list last synced: it only grows by appends
        self.tokens: list[int] = []
        self.seen: set[int] = set()
        self._seen_mask = np.zeros(1024, dtype=bool)  # seen as a mask over token ids, grown as needed
        self.followers: dict[tuple[int, ...], set[int]] = {}

    def sync(self, history: Sequence[int]) -> None:
        done = len(self.tokens)
        if history is not self._source or len(history) < done:
            history = history if isinstance(history, list) else [int(t) for t in history]
            if len(history) < done or history[:done] != self.tokens:
                self._reset()
                done = 0
            self._source = history
        n = self.n
        for token in history[done:]:
            token = int(token)
            self.tokens.append(token)
            self.seen.add(token)
            self._cover(token)
            self._seen_mask[token] = True
            if n > 1 and len(self.tokens) >= n:
                self.followers.setdefault(tuple(self.tokens[-n:-1]), set()).add(token)

    def seen_of(self, ids: np.ndarray, top: int | None = None) -> np.ndarray:
        """Whether each of ``ids`` (int, any shape; ``top``: their largest, if known) is in the
        indexed history: bool, same shape."""
        self._cover(int(ids.max()) if top is None else top)
        return self._seen_mask[ids]

    def _cover(self, token: int) -> None:
        """Grow the seen mask to hold ``token``."""
        if token >= self._seen_mask.size:
            self._seen_mask = np.concatenate([self._seen_mask, np.zeros(token + 1, dtype=bool)])

    def banned(self) -> set[int]:
        """``banned_ngram_tokens`` of the indexed history, as a set."""
        n = self.n
        if n <= 0 or len(self.tokens) < n:
            return set()
        if n == 1:
            return self.seen
        return self.followers.get(tuple(self.tokens[len(self.tokens) - n + 1:]), set())


class Sampler:
    """Picks next tokens for ``batch_size`` streams sharing one ``SearchOptions``.

    Row ``i`` draws from its own generator, spawned from ``options.seed``. Not thread-safe.
    """

    def __init__(self, options: SearchOptions, batch_size: int = 1) -> None:
        self.options = options
        self._rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(options.seed).spawn(batch_size)]
        self.index = HistoryIndex(options.no_repeat_ngram_size)  # row 0's history, for ``pick``

    @property
    def rng(self) -> np.random.Generator:
        """Row 0's generator (what ``pick`` and ``next_token`` draw from)."""
        return self._rngs[0]

    def process(self, logits: np.ndarray, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """Logits (batch, vocab) after every processor the options enable, -inf where banned."""
        o = self.options
        logits = apply_repetition_penalty(logits, histories, o.repetition_penalty)
        logits = apply_no_repeat_ngram(logits, histories, o.no_repeat_ngram_size)
        if o.greedy:
            return logits
        logits = logits / np.float32(o.temperature)
        logits = apply_top_k(logits, o.top_k)
        return apply_top_p(logits, o.top_p)

    def next_tokens(self, logits: np.ndarray, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """Next token id per row, int64 (batch,). ``histories`` are prompt + reply ids per row."""
        if logits.ndim != 2 or logits.shape[0] != len(histories) or len(histories) > len(self._rngs):
            raise ValueError(f"logits {logits.shape} do not match {len(histories)} histories / "
                             f"{len(self._rngs)} streams")
        logits = self.process(logits, histories)
        if self.options.greedy:
            return logits.argmax(axis=-1).astype(np.int64)
        picks = np.empty(len(histories), dtype=np.int64)  # (batch,)
        for row, rng in enumerate(self._rngs[: len(histories)]):
            picks[row] = _draw(logits[row], rng)
        return picks

    def next_token(self, logits: np.ndarray, history: Sequence[int], bonus: Mapping[int, float] | None = None) -> int:
        """Row 0's next token from its whole logits row (1, vocab) plus ``bonus`` (token → logits, as
        ``add_bonus``): ``next_tokens`` of the bonused row, the same token and draw, but by
        way of the row's ``WIDE_TOP`` best logits and the bonus tokens' own (``pick``), and over the
        whole vocabulary only when those cannot decide."""
        from . import topk  # ONNX Runtime's TopK; this module stays importable without it

        if logits.shape[-1] > max(topk.MIN_VOCAB, WIDE_TOP):  # a small vocabulary costs less whole
            ids, values = topk.host_topk(WIDE_TOP).of_array(logits)
            ids, values, floor = ids[0], values[0], np.float32(values.min())
            if bonus:  # the bonus tokens join with their own logits; the floor stays the top's
                extra = np.fromiter(bonus, dtype=np.int64, count=len(bonus))
                ids, first = np.unique(np.concatenate([ids, extra]), return_index=True)
                values = np.concatenate([values, logits[0, extra]])[first]
            token = self.pick(ids, values, history, bonus, floor=floor)
            if token is not None:
                return token
        return int(self.next_tokens(add_bonus(logits, bonus or {}), [history])[0])

    def pick(self, ids: np.ndarray, values: np.ndarray, history: Sequence[int],
             bonus: Mapping[int, float] | None = None, *, floor: float | None = None) -> int | None:
        """Row 0's next token from candidates: distinct ``ids`` with their raw logits ``values``
        (any order; ``topk.TopTokens``), after adding ``bonus`` (token → logits, as ``add_bonus``):
        the token ``next_tokens`` would pick from the whole logits row, with the same draw of the
        row's generator; None when the candidates cannot decide (nothing is drawn then).
        ``floor``: no token outside ``ids`` has a raw logit above it (default: the smallest of
        ``values``). ``pick.pick_rows`` of this one row; why it is exact is said there."""
        from .pick import pick_rows

        floors = None if floor is None else np.asarray([floor], dtype=np.float32)
        return pick_rows([self], ids[None], values[None], [history], [bonus or {}], floors)[0]


def add_bonus(logits: np.ndarray, bonus: Mapping[int, float]) -> np.ndarray:
    """``logits`` (1, vocab) plus ``bonus`` (token id → logits; fact steering's), a copy; ``logits``
    itself when empty."""
    if not bonus:
        return logits
    out = logits.copy()
    ids = np.fromiter(bonus, dtype=np.int64, count=len(bonus))
    out[:, ids] += np.fromiter(bonus.values(), dtype=out.dtype, count=len(bonus))
    return out


def _draw(row: np.ndarray, rng: np.random.Generator) -> int:
    """Index of a token drawn from one processed logits row (-inf where banned): ``draw`` over its
    allowed tokens (after top-k, only k of them)."""
    allowed = np.flatnonzero(np.isfinite(row))  # (n,)
    return int(allowed[draw(row[allowed][None], [rng])[0]])
