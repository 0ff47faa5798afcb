"""Reranking sampled replies, in the spirit of DialoGPT's MMI reranking.

A reply is sampled ``candidates`` times (different seeds); each candidate is scored and the best
returned. Two scores, both torch-free through the engine's ``LanguageModel``:

* ``likelihood`` (reverse, "MMI") — the mean log-probability of a short persona statement
  (``I am Bram, the blacksmith …``) *given the reply*: the model reads the reply as the NPC's line
  and is teacher-forced through the statement. A reply that fits the character makes the statement
  likely; a generic or out-of-character one does not. All candidates are scored together in one
  left-padded ``DecodeBatch``: one forward per statement token, whatever the number of candidates.
* ``overlap`` — the share of the persona's content words (name, role, traits, facts) the reply
  uses, minus a penalty for words that break character ("AI", "language model", …).

* ``grounding`` (``grounding.grounding_score``) — text checks against what the NPC was given this
  turn (persona, recalled memory, lore, context, the player's lines): +1 for stating a word of the
  fact the player asks about, −1 per invented proper name or false "I am X", −2 for breaking
  character. Needs the turn's ``Grounding``; without one it scores 0.

``method="both"`` adds likelihood and overlap (overlap weighted by ``overlap_weight``);
``"grounded"`` (the default) adds the grounding score too, weighted by ``grounding_weight``. Ties
keep the earliest candidate, so scoring is deterministic given the candidates.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .batch import DecodeBatch, new_batch
from .dialogue import Turn
from .errors import ConfigError, PromptError
from .generator import LanguageModel
from .grounding import Grounding, grounding_score
from .sampling import SearchOptions

if TYPE_CHECKING:
    from .dialogue import DialogueFormatter
    from .persona import Persona

Method = Literal["likelihood", "overlap", "both", "grounded"]
METHODS: tuple[str, ...] = ("likelihood", "overlap", "both", "grounded")
MAX_CANDIDATES = 16
GREEDY_FALLBACK_TEMPERATURE = 0.7  # candidates of a greedy say are sampled at this temperature
MAX_SEED = 2**63 - 1
OUT_OF_CHARACTER = ("ai", "assistant", "language model", "chatbot", "openai")
_STOPWORDS = frozenset(
    "a an the and or but of to in on at by for with from as is are was were be been am i you he she it we they "
    "my your his her its our their me him them this that these those who what when where why how not no so "
    "do does did have has had will would can could should there here all any some one about into over".split()
)
_WORD = re.compile(r"[a-z0-9']+")


@dataclass(frozen=True)
class RerankConfig:
    """Per-NPC reranking. ``candidates`` replies are sampled (1 = off, the default); ``method``
    picks the score; ``overlap_weight`` scales the overlap score (``both``, ``grounded``),
    ``grounding_weight`` the grounding score (``grounded``)."""

    candidates: int = 1
    method: Method = "grounded"
    overlap_weight: float = 1.0
    grounding_weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.candidates, int) or isinstance(self.candidates, bool) or not 1 <= self.candidates <= MAX_CANDIDATES:
            raise ConfigError(f"rerank.candidates must be an integer in [1, {MAX_CANDIDATES}], got {self.candidates!r}.")
        if self.method not in METHODS:
            raise ConfigError(f"rerank.method must be one of {list(METHODS)}, got {self.method!r}.")
        for name in ("overlap_weight", "grounding_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 100:
                raise ConfigError(f"rerank.{name} must be a number in [0, 100], got {value!r}.")

    @property
    def enabled(self) -> bool:
        return self.candidates > 1

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "persona") -> RerankConfig:
        """From a TOML table / JSON map; ``PromptError`` naming the bad field."""
        if not isinstance(data, dict):
            raise PromptError(f"{source}: field 'rerank' must be a table, got {type(data).__name__}.")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise PromptError(f"{source}: unknown field(s) {unknown} in 'rerank'; known: {', '.join(known)}.")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise PromptError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def content_words(text: str) -> set[str]:
    """Lower-case words of ``text`` that carry meaning (no stop words, at least 3 letters)."""
    return {w.strip("'") for w in _WORD.findall(text.lower()) if len(w.strip("'")) >= 3 and w not in _STOPWORDS}


def overlap_score(reply: str, persona: Persona) -> float:
    """Share of the persona's content words in ``reply`` (0..1, over at most 12 of them, so long
    personas are not unreachable), minus 0.5 per out-of-character word."""
    facts = " ".join([persona.name, persona.role, *persona.traits, *persona.background, *persona.goals])
    persona_words = content_words(facts)
    words = content_words(reply)
    hits = len(words & persona_words)
    score = hits / max(1, min(12, len(persona_words)))
    lowered = f" {' '.join(_WORD.findall(reply.lower()))} "
    penalty = sum(0.5 for bad in OUT_OF_CHARACTER if f" {bad} " in lowered)
    return score - penalty


def persona_statement(persona: Persona) -> str:
    """The sentence the reverse score asks the model to predict after a reply."""
    return f"I am {persona.name}, {persona.role}." if persona.role else f"I am {persona.name}."


def likelihood_scores(model: LanguageModel, formatter: DialogueFormatter, replies: Sequence[str],
                      persona: Persona) -> list[float]:
    """Mean log p(persona statement | reply) per reply, all replies in one padded batch.

    Each row is ``reply as an NPC turn, then the player asks 'Who are you?'``, prefilled alone;
    then the statement's tokens are fed one per step to every row together: (rows, 1) → (rows, vocab).
    """
    question = formatter.turn_ids(Turn("user", "Who are you?"))
    statement = formatter.tokenizer.encode(persona_statement(persona), allow_special=False)
    target = formatter.generation_prompt_ids() + statement
    if not replies or not target:
        return [0.0] * len(replies)
    batch: DecodeBatch[int] = new_batch(model)
    joiners = []
    first_logits = []
    for index, reply in enumerate(replies):
        cache = model.new_cache(batch_size=1)
        ids = formatter.turn_ids(Turn("assistant", reply.strip() or "...")) + question
        logits = model.forward(np.asarray([ids], dtype=np.int64), cache)  # (1, vocab) predicting target[0]
        first_logits.append(logits[0])
        joiners.append((index, cache))
    batch.add(joiners)
    totals = np.asarray([_log_softmax(row)[target[0]] for row in first_logits], dtype=np.float64)  # (rows,)
    for position in range(1, len(target)):
        logits = batch.forward([target[position - 1]] * len(replies))  # (rows, vocab)
        totals += np.asarray([_log_softmax(row)[target[position]] for row in logits])
    batch.remove(set(batch.rows))  # slot models get their slots back now
    return [float(t) / len(target) for t in totals]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - float(np.max(logits))
    return shifted - math.log(float(np.exp(shifted).sum()))


def score_candidates(model: LanguageModel, formatter: DialogueFormatter, replies: Sequence[str], persona: Persona,
                     config: RerankConfig, grounding: Grounding | None = None) -> list[float]:
    """One score per reply (higher is better) under ``config.method``; ``grounding`` is this turn's
    (``Grounding.build``), used by ``grounded``."""
    scores = [0.0] * len(replies)
    if config.method in ("likelihood", "both", "grounded"):
        scores = likelihood_scores(model, formatter, replies, persona)
    if config.method in ("overlap", "both", "grounded"):
        weight = 1.0 if config.method == "overlap" else config.overlap_weight
        scores = [s + weight * overlap_score(r, persona) for s, r in zip(scores, replies)]
    if config.method == "grounded" and grounding is not None:
        scores = [s + config.grounding_weight * grounding_score(r, grounding) for s, r in zip(scores, replies)]
    return scores


def best_index(scores: Sequence[float]) -> int:
    """Index of the highest score; the earliest on ties."""
    if not scores:
        raise ConfigError("Reranking needs at least one candidate.")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def candidate_options(options: SearchOptions, config: RerankConfig, seed: int) -> list[SearchOptions]:
    """Search options of each candidate: always sampled (greedy candidates would all be one reply;
    a greedy say's candidates use ``GREEDY_FALLBACK_TEMPERATURE``), seeds ``seed``, ``seed + 1``, …"""
    temperature = options.temperature if options.do_sample and options.temperature > 0 else GREEDY_FALLBACK_TEMPERATURE
    return [dataclasses.replace(options, do_sample=True, temperature=temperature, seed=(seed + i) % MAX_SEED)
            for i in range(config.candidates)]
