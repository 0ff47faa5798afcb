"""Long-term facts about a player: extraction from the player's lines, keywords, and retrieval.

Extraction is a handful of deterministic patterns over one player line, each giving a sentence in
the third person that can go into any NPC's prompt as it stands::

    "My name is Mira."            → The player's name is Mira.          (kind "name": one per pair)
    "Call me Mira" / "I'm Mira"   → The player's name is Mira.
    "I'm from Eastwatch."         → The player is from Eastwatch.       (kind "origin"; also "I came from …")
    "I came here to buy a plough" → The player came to buy a plough.    (buy, sell, find, fetch, order, …)
    "I'm looking for fresh eels"  → The player is looking for fresh eels. (also "I'm after …", "searching for")
    "I bought the iron sword."    → The player bought the iron sword.
    "I have two goats"            → The player has two goats.
    "I'm a carpenter."            → The player is a carpenter.
    "I love apples"               → The player loves apples.
    "My brother is Tom."          → The player's brother is Tom.

Patterns, not a model: the same line always yields the same facts, and a line that matches none
yields none (``I'm tired`` is not a name: a name must start with a capital letter). Retrieval scores
each fact by how many keywords it shares with the player's line and the game context; the name
fact is always included. Stateless and thread-safe.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

MAX_FACT_CHARS = 300       # a fact's text, from the game or extracted
MAX_PHRASE_CHARS = 80      # what an extracted pattern takes after its trigger words
MIN_SIMILARITY = 0.2       # embedding cosine that makes a fact relevant without a shared keyword (MiniLM:
                           # related sentences scored 0.22-0.25, unrelated ones -0.03-0.17 in our samples)

FactKind = str             # "name" | "origin" | "other"
SOURCES = ("dialogue", "game")
ALWAYS_RECALLED = ("name", "origin")  # fact kinds in every turn's prompt, whatever the line
# What a stated fact is about, from its third-person form ("The player is a carpenter." is their work).
# Retrieval and grounding match these to the topics a line asks about (``grounding.TOPICS``): "What
# did I say my trade was?" shares no keyword with "The player is a carpenter.", but both are "work".
_FACT_TOPICS = (
    ("name", re.compile(r"(?i)\bthe player's name is\b|\bthe player is called\b")),
    ("work", re.compile(r"(?i)\bthe player (?:is an? |works\b|worked\b)|\bthe player's (?:trade|job|work|craft)\b")),
    ("home", re.compile(r"(?i)\bthe player (?:is from|comes from|came from|lives|lived|grew up)\b")),
    ("want", re.compile(r"(?i)\bthe player (?:came to|comes to|needs|needed|wants|wanted|is looking for|"
                        r"would like|is after|is here to)\b")),
)


@dataclass(frozen=True)
class Fact:
    """A stored fact. ``created`` is Unix time in seconds; ``turn_id`` the turn it came from (dialogue)."""

    id: int
    text: str
    kind: FactKind
    source: str
    created: float
    keywords: tuple[str, ...]
    turn_id: int | None = None

    def to_wire(self) -> dict[str, object]:
        return {"id": self.id, "text": self.text, "kind": self.kind, "source": self.source,
                "created": self.created, "keywords": list(self.keywords)}


@dataclass(frozen=True)
class NewFact:
    """A fact before it is stored."""

    text: str
    kind: FactKind = "other"


_STOPWORDS = frozenset("""
a about above after again all also am an and any are as at be because been before being below both but by can
could did do does doing down during each few for from further had has have having he her here hers him his how
i if in into is it its itself just me more most my myself no nor not now of off on once only or other our ours
out over own same she should so some such than that the their theirs them then there these they this those
through to too under until up very was we were what when where which while who whom why will with would you
your yours yourself player players s t don didn ll re ve m d really still yes oh well hey hello hi please
""".split())
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")

# Words after "I'm"/"I am" that start a sentence with a capital but are not names.
_NOT_NAMES = frozenset("""
sorry fine here there back not so just the a an from in at looking going glad afraid sure ok okay only also
very new good well tired hungry lost ready done still always never really
""".split())

_NAME = r"((?:[A-Z][\w'-]*)(?:\s+[A-Z][\w'-]*){0,2})"
_PHRASE = r"([^.,!?;:\n]{1,%d}?)(?=\s+(?:and|but|so|because)\s|[.,!?;:\n]|$)" % MAX_PHRASE_CHARS
_NAME_PATTERNS = (
    re.compile(r"(?i:\bmy name(?:'s| is)|\bcall me|\bthey call me|\bi(?:'m| am) called|\bname's)\s+" + _NAME),
    re.compile(r"(?i:\bi(?:'m| am))\s+" + _NAME + r"(?=\s*(?:[.,!?;]|$|\s+(?i:and|from|of|the)\b))"),
)
_PLACE = r"([^.,!?;:\n]{1,%d}?)(?=\s+(?:and|but|so|because|to|for|with|on|in order)\s|[.,!?;:\n]|$)" % MAX_PHRASE_CHARS
_ORIGIN = re.compile(r"(?i:\bi(?:'m| am)(?:\s+[A-Z][\w'-]*){0,3} from|\bi (?:come|came|have come|'ve come|travelled|"
                     r"traveled) (?:all the way |here |over )?from|\bi grew up in)\s+" + _PLACE)
_PURPOSES = ("buy", "sell", "find", "fetch", "get", "order", "trade", "see", "hire", "deliver", "collect", "repair")
_PURPOSE = re.compile(r"(?i:\bi(?:'m| am|'ve| have)? (?:come|came|here|travelled|traveled|walked|rode)\b[^.!?;\n]{0,40}?"
                      r"\bto (" + "|".join(_PURPOSES) + r"))\s+" + _PHRASE)
_SEEKING = re.compile(r"(?i:\bi(?:'m| am)(?: here)? (?:looking|searching|hunting) for|\bi(?:'m| am) after|"
                     r"\bi(?:'m| am) hoping to find)\s+(?!(?i:you|it|that|this|nothing|work)\b)" + _PHRASE)
_HOME = re.compile(r"(?i:\bi live in|\bi(?:'m| am) living in)\s+" + _PHRASE)
_ROLE = re.compile(r"(?i:\bi(?:'m| am) (an?))\s+" + _PHRASE)
_VERBS = {"bought": "bought", "found": "found", "sold": "sold", "lost": "lost", "stole": "stole", "killed": "killed",
          "slew": "slew", "own": "owns", "have": "has", "need": "needs", "want": "wants", "carry": "carries",
          "love": "loves", "like": "likes", "hate": "hates", "fear": "fears"}
_ACTION = re.compile(r"(?i:\bi\s+(?:just\s+|already\s+|really\s+)?(" + "|".join(_VERBS) + r"))\s+"
                     r"(?!(?i:to|been|no|not|nothing|it|that|this|you)\b)" + _PHRASE)
_MY_X_IS = re.compile(r"(?i:\bmy\s+([a-z]+(?:\s+[a-z]+)?)\s+(?:is|was))\s+" + _PHRASE)
_PRONOUNS = {"my": "their", "me": "them", "myself": "themselves", "mine": "theirs", "i": "they", "i'm": "they're"}


def extract_facts(line: str) -> list[NewFact]:
    """The facts one player line states, in the order found (at most one name)."""
    facts: list[NewFact] = []
    name = _find_name(line)
    if name:
        facts.append(NewFact(f"The player's name is {name}.", "name"))
    for match in _ORIGIN.finditer(line):
        facts.append(NewFact(f"The player is from {_third_person(match.group(1))}.", "origin"))
    for match in _PURPOSE.finditer(line):
        facts.append(NewFact(f"The player came to {match.group(1).lower()} {_third_person(match.group(2))}."))
    for match in _SEEKING.finditer(line):
        facts.append(NewFact(f"The player is looking for {_third_person(match.group(1))}."))
    for match in _HOME.finditer(line):
        facts.append(NewFact(f"The player lives in {_third_person(match.group(1))}.", "origin"))
    for match in _ROLE.finditer(line):
        facts.append(NewFact(f"The player is {match.group(1).lower()} {_third_person(match.group(2))}."))
    for match in _ACTION.finditer(line):
        verb = _VERBS[match.group(1).lower()]
        facts.append(NewFact(f"The player {verb} {_third_person(match.group(2))}."))
    for match in _MY_X_IS.finditer(line):
        what = match.group(1).lower()
        if what != "name":
            facts.append(NewFact(f"The player's {what} is {_third_person(match.group(2))}."))
    unique = {f.text: f for f in facts if len(f.text) <= MAX_FACT_CHARS and _content(f.text)}
    return list(unique.values())


def _find_name(line: str) -> str | None:
    for pattern in _NAME_PATTERNS:
        for match in pattern.finditer(line):
            words = match.group(1).split()
            while words and words[-1].lower() in _NOT_NAMES:
                words.pop()
            if words and words[0].lower() not in _NOT_NAMES:
                return " ".join(words)
    return None


def _third_person(phrase: str) -> str:
    words = phrase.strip().split()
    return " ".join(_PRONOUNS.get(w.lower(), w) for w in words)


def _content(text: str) -> bool:
    """True when the fact says something beyond 'The player …' (has a keyword besides its verb)."""
    return bool(set(keywords(text)) - {"name", "s"} - set(_VERBS.values()))


def keywords(text: str) -> tuple[str, ...]:
    """Lower-case content words of ``text``, crudely singularised, sorted and unique."""
    out = set()
    for word in _WORD.findall(text.lower()):
        word = word.removesuffix("'s")
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        if len(word) > 1 and word not in _STOPWORDS:
            out.add(word)
    return tuple(sorted(out))


def fact_topics(text: str) -> frozenset[str]:
    """The topics (``name``, ``work``, ``home``, ``want``) a fact about the player states, from its form."""
    return frozenset(topic for topic, pattern in _FACT_TOPICS if pattern.search(text))


def retrieve(facts: Sequence[Fact], query: Iterable[str], limit: int,
             similarity: Mapping[int, float] | None = None, topics: Iterable[str] = ()) -> list[Fact]:
    """The facts worth putting in this turn's prompt, oldest first.

    Every ``name`` and ``origin`` fact (who the player is and where they come from: asked as "which
    town did I come from?", which shares no keyword with "The player is from Dunmore."), then the
    best scoring up to ``limit`` in all (newer first on ties). A fact
    scores one per keyword it shares with ``query``, one when it states a topic the line asks about
    (``topics``, e.g. "work" for "what was my trade?"; see ``fact_topics``), plus its embedding
    similarity to the turn (``similarity`` by fact id, cosine in [-1, 1]) when given. A fact is left
    out unless it shares a keyword or a topic, or its similarity reaches ``MIN_SIMILARITY``.
    """
    wanted, similar, asked = set(query), similarity or {}, set(topics)
    chosen = [f for f in facts if f.kind in ALWAYS_RECALLED]
    scored = []
    for f in facts:
        overlap = len(wanted.intersection(f.keywords)) + bool(asked & fact_topics(f.text))
        cosine = similar.get(f.id, 0.0)
        if f.kind not in ALWAYS_RECALLED and (overlap > 0 or cosine >= MIN_SIMILARITY):
            scored.append((overlap + max(cosine, 0.0), f.created, f.id, f))
    scored.sort(key=lambda s: (s[0], s[1], s[2]), reverse=True)
    chosen += [s[3] for s in scored[:max(0, limit - len(chosen))]]
    return sorted(chosen, key=lambda f: (f.created, f.id))


def game_fact(text: str) -> NewFact:
    """A fact the game states (``memory.remember``); ``ValueError`` when it is empty or too long."""
    text = " ".join(text.split())
    if not text:
        raise ValueError("A fact must be a non-empty sentence.")
    if len(text) > MAX_FACT_CHARS:
        raise ValueError(f"A fact is at most {MAX_FACT_CHARS} characters; this one has {len(text)}.")
    kind = "name" if re.match(r"(?i:the player's name is)\s+[A-Z]", text) else "other"
    return NewFact(text if text[-1] in ".!?" else text + ".", kind)
