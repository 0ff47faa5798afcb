"""What an NPC remembers in one turn: recent turns fitted to a token budget, the rolling summary,
and the recalled facts as prompt text.

* Short-term memory is the pair's recent turns (``store.MemoryStore`` keeps the last
  ``MemoryConfig.recent_turns`` verbatim). ``fit_turns`` is the one place they are cut to the
  model's context: oldest turns go first, the kept history always opens with a player line, and
  what must stay (the persona prefix, the memory block, the new line) is never cut.
* Long-term memory is facts (``facts.py``) and a rolling summary: when an exchange falls out of
  the recent window, ``fold_summary`` appends one extractive line for it (the most informative
  sentence of the player's line and of the reply, quoted: ``Player: "…" You: "…"``) and drops the oldest lines beyond
  ``MemoryConfig.summary_chars``. Deterministic, no model call, cheap inside the turn's transaction.
* ``Recall`` is what goes into one prompt: retrieved facts and the summary, rendered by
  ``Recall.notes`` as notes after the persona prefix (``npcs.PromptBuilder``). Stateless and thread-safe.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .dialogue import Turn
from .errors import ConfigError, PromptError
from .facts import Fact, keywords

MAX_RECENT_TURNS = 256  # memory.get lists them in one array, and a protocol array holds at most 256
SUMMARY_QUOTE_CHARS = 120
FACTS_QUESTION = "Do you remember me?"              # DialoGPT: memory notes are answers to these questions
SUMMARY_QUESTION = "What did we talk about before?"
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*")


@dataclass(frozen=True)
class MemoryConfig:
    """Memory settings. ``path``: the SQLite file (``:memory:`` keeps nothing across restarts)."""

    path: str = ":memory:"
    recent_turns: int = 16        # lines (player + NPC) kept verbatim per pair; older ones go to the summary
    summary_chars: int = 1200     # rolling summary per pair, oldest lines dropped beyond this
    facts_per_turn: int = 6       # facts retrieved into one prompt (the name fact counts)
    max_facts: int = 200          # facts kept per pair; the oldest non-name fact goes first
    synchronous: str = "full"     # SQLite synchronous: "full" survives power loss, "normal" only crashes
    embeddings: str = "off"       # fact retrieval by sentence embeddings too: "on", "off", "auto" (if installed)

    def __post_init__(self) -> None:
        if not 2 <= self.recent_turns <= MAX_RECENT_TURNS or self.recent_turns % 2:
            raise ConfigError(f"recent_turns must be an even number in [2, {MAX_RECENT_TURNS}] (a player line and a "
                              f"reply each), got {self.recent_turns}.")
        for name, low, high in (("summary_chars", 0, 100_000), ("facts_per_turn", 0, 64), ("max_facts", 1, 250)):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(f"{name} must be in [{low}, {high}], got {value}.")
        if self.embeddings not in ("on", "off", "auto"):
            raise ConfigError(f"embeddings must be 'on', 'off' or 'auto', got {self.embeddings!r}.")
        if self.synchronous not in ("full", "normal"):
            raise ConfigError(f"synchronous must be 'full' or 'normal', got {self.synchronous!r}.")


@dataclass(frozen=True)
class Recall:
    """Long-term memory for one prompt: the retrieved facts (oldest first) and the summary."""

    facts: tuple[Fact, ...] = ()
    summary: str = ""

    def notes(self) -> list[tuple[str, str]]:
        """As prompt notes (question, note) for ``PromptBuilder.build``; "you" is the NPC."""
        out = []
        if self.facts:
            out.append((FACTS_QUESTION, "What you remember about the player: " + " ".join(f.text for f in self.facts)))
        if self.summary:
            out.append((SUMMARY_QUESTION, "Earlier, you talked about this: " + " ".join(self.summary.splitlines())))
        return out


def query_keywords(line: str, context_text: str = "") -> set[str]:
    """What a turn is about, for retrieval: the player's line and the game context."""
    return set(keywords(line)) | set(keywords(context_text))


def fit_turns(turn_ids: Callable[[Turn], list[int]], history: Sequence[Turn], tail: list[int], budget: int,
              what: str = "the player's line") -> list[int]:
    """History + ``tail`` (memory block, new line, generation prompt) as ids within ``budget`` tokens.

    The oldest turns are dropped first, whole, and the kept history opens with a player line;
    ``tail`` is never cut: ``PromptError`` when it alone exceeds ``budget``.
    """
    encoded = [turn_ids(t) for t in history]
    total = sum(map(len, encoded)) + len(tail)
    start = 0
    while total > budget:
        if start >= len(history):
            raise PromptError(f"{what} takes {len(tail)} tokens; at most {budget} fit beside the persona and the reply.")
        total -= len(encoded[start])
        start += 1
        while start < len(history) and history[start].role != "user":
            total -= len(encoded[start])
            start += 1
    return [t for ids in encoded[start:] for t in ids] + tail


def fold_summary(summary: str, exchanges: Sequence[tuple[str, str]], max_chars: int) -> str:
    """``summary`` with one line per (player line, reply) appended, trimmed to ``max_chars`` (oldest out)."""
    lines = [line for line in summary.splitlines() if line.strip()]
    for said, reply in exchanges:
        player, npc = _key_sentence(said), _key_sentence(reply)
        if player or npc:
            lines.append(f'Player: "{player}"' + (f' You: "{npc}"' if npc else ""))
    while lines and sum(len(line) + 1 for line in lines) - 1 > max_chars:
        lines.pop(0)
    return "\n".join(lines)


def _key_sentence(text: str) -> str:
    """The sentence of ``text`` with the most content words (the first on ties), shortened."""
    sentences = [s.strip() for s in _SENTENCE.findall(text) if s.strip()]
    if not sentences:
        return ""
    best = max(sentences, key=lambda s: (len(keywords(s)), -sentences.index(s)))
    if len(best) > SUMMARY_QUOTE_CHARS:
        best = best[:SUMMARY_QUOTE_CHARS].rsplit(" ", 1)[0] + "…"
    return best.replace('"', "'")
