"""Is a candidate reply grounded in what the NPC was given? Cheap text checks for reranking.

Small chat models fail a persona in a few recognisable ways; each check below scores one of them
from text alone (no model call), so a reranker (``rerank.score_candidates``) can prefer the
candidate that stays inside what the NPC knows:

* **invented names** — capitalised words the reply introduces that occur nowhere in the grounding
  (the persona, recalled memory, lore, the game context, the player's lines): Bram calling himself
  "Grimbold Ironfrost", a village called "Ashfield". The NPC's own earlier replies do not count as
  grounding, so a name it invented once is not canonised.
* **identity claims** — "I am X", "my name is X", "call me X", "X, at your service" where X is not
  the persona's name ("I'm Captain Blackheart" after "you are now a pirate").
* **answering the question** — the player's line is mapped to topics (name, work, home, wants, and
  its own content words) and to whose facts it asks about (``my name`` → the player's, ``your name``
  → the NPC's); a reply that states a word of a matching fact ("Bram", "Ashford", "Mira") scores.
* **breaking character** — "as an AI", "language model", "chatbot", …

Topic words are plain English question words, not tied to any persona. Stateless and thread-safe.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .facts import fact_topics

if TYPE_CHECKING:
    from .persona import Persona

# Question words → topic. A fact and a question match when they share a topic or a content word.
TOPICS: dict[str, frozenset[str]] = {
    "name": frozenset("name names named called call who".split()),
    "work": frozenset("job work works working do does living trade profession occupation business craft role".split()),
    "home": frozenset("live lives living home where village town city place from come came born here".split()),
    "want": frozenset("buy bought want wants need needs came come errand looking purchase sell get here".split()),
    "price": frozenset("much cost costs price prices pay paid charge charges toll fee fees worth silver copper coppers "
                       "gold coin coins".split()),
}
# Whose facts a line asks about: possessives decide first ("I forgot. What is your name?" asks the NPC's),
# then subjects ("Where do I live?"); a line with both or neither may mean either.
PLAYER_WORDS = (frozenset("my mine myself".split()), frozenset("i me i'm i've".split()))
NPC_WORDS = (frozenset("your yours yourself".split()), frozenset("you you're".split()))
# Words that frame an identity attack rather than describe the identity it pushes.
ATTACK_FRAME = frozenset("""ignore forget forgot pretend talk speak act play playing behave role roleplay character
instructions instruction everything anything told tell game let lets let's now from stop being new rules rule prompt
system reset say says really longer anymore more only like who whom whose which while""".split())
# Words of a player fact's frame ("The player needs …", "… came to buy …"), not of its answer.
FACT_FRAME = frozenset("name named called needs needed wants wanted came comes come lives lived has had owns "
                       "likes loves hates fears carries bought".split())
# Words that make a line without a question mark ask something ("I didn't catch your name.",
# "Remind me what you do here.", "Tell me where I'm from.").
ASKING_WORDS = frozenset("tell remember remind recall what who where which catch forgot forget".split())
OUT_OF_CHARACTER = ("as an ai", "an ai", "ai language model", "language model", "chatbot", "openai",
                    "virtual assistant", "ai assistant", "computer program")
# Capitalised words that are not names (sentence starters the heuristics might see mid-sentence).
COMMON_CAPITALS = frozenset("""
i i'm i'll i've i'd ok okay oh ah aye mr mrs ms sir madam lady lord master mister miss god gods heavens
monday tuesday wednesday thursday friday saturday sunday january february march april may june july
august september october november december english yes no well hello hey hi please thanks
""".split())
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_TOLD_YOU = re.compile(r"(?i)\b(?:tell|told|say|said|mention|mentioned|give|gave|show|showed)\s+(?:to\s+)?you\b")
# A line that tries to change who the NPC is (roleplay jailbreaks and fake system messages).
_IDENTITY_ATTACK = re.compile(
    r"(?i)\b(?:you(?:'re| are) (?:now|no longer|not really)\b|from now on\b|pretend (?:to be|you(?:'re| are))|"
    r"(?:act|talk|speak|behave) (?:as|like) (?:a|an)\b|role-?play as\b|play the (?:role|part) of\b|"
    r"ignore (?:all |your |the |any |previous |prior )*(?:instructions|rules|prompt|persona|character)|"
    r"forget (?:who|what) you are|new instructions|stop being\b)|^\s*system\s*:")
_ABOUT_PLAYER = re.compile(r"(?i)\bthe player\b")
# "What is the inn called?", "the name of this town", "your horse's name": a line asking the name of a
# thing (a noun after a determiner), not of the one it talks to ("What are you called?", "your name").
_DETERMINER = r"(?:the|this|that|these|those|your|my|our|his|her|their)"
_NAMES_A_THING = re.compile(rf"(?i)\b{_DETERMINER}\s+(?!name\b)[a-z][a-z'-]*\s+(?:is\s+|are\s+)?(?:called|named)\b"
                            rf"|\bname\s+of\s+{_DETERMINER}\s+[a-z]|\b{_DETERMINER}\s+(?!name\b)[a-z][a-z-]*'s\s+name\b")
# "Who are you?", "Who am I talking to?", "Who's there?": "who" asking a name of the two speaking. In
# "Who gives you your orders?" or "Who is your captain?" it asks about someone else.
_WHO_OF_US = re.compile(r"(?i)\bwho(?:'s|'re|\s+(?:are|is|am|was|were))?\s+(?:you|i|me|this|that|there|it|speaking)\b")
_TALKING_TO = re.compile(r"(?i)\b(?:am\s+i|are\s+we)\s+(?:talking|speaking)\s+(?:to|with)\b")
_CAPITAL = re.compile(r"[A-Z][a-z]+(?:[-'][A-Za-z]+)*")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;\"“]\s*|\n\s*)$")
_CLAIM = re.compile(r"(?i:\bI am|\bI'm|\bmy name is|\bmy name's|\bcall me|\bthey call me)"
                    r"\s+(?:(?i:the|a|an|called|named|just|only|simply|old|young|captain|lord|lady|sir)\s+)*"
                    r"([A-Z][a-z][A-Za-z'-]*)")
_STOP = frozenset("""
a an the and or but of to in on at by for with from as is are was were be been am i you he she it we they my your
his her its our their me him them this that these those what when where why how not no so do does did have has had
will would can could should there here all any some one about into over just very well yes oh tell again know
remember player player's said say told
""".split())


# Every say splits the persona's texts, the player's earlier lines and the memory notes again: the
# same texts, so their words are kept (bounded, per process).
TEXT_CACHE = 8192


@functools.lru_cache(maxsize=TEXT_CACHE)
def _words(text: str) -> tuple[str, ...]:
    return tuple(w.lower().removesuffix("'s").strip("'-") for w in _WORD.findall(text))


def words(text: str) -> list[str]:
    """Lower-case words of ``text`` (apostrophes kept, possessive 's dropped)."""
    return list(_words(text))


@functools.lru_cache(maxsize=TEXT_CACHE)
def content(text: str) -> frozenset[str]:
    """Words of ``text`` that carry meaning: no stop words, at least 3 letters."""
    return frozenset(w for w in _words(text) if len(w) >= 3 and w not in _STOP)


def stem(word: str) -> str:
    """``word`` without a plain English ending, so a line and a fact meet on it ("cross" and
    "crossing", "copper" and "coppers"); crude on purpose: only ever compared with itself."""
    for ending, keep in (("ing", 4), ("es", 4), ("ed", 4), ("s", 3)):
        if word.endswith(ending) and len(word) - len(ending) >= keep and not word.endswith("ss"):
            return word[:-len(ending)]
    return word


def asked_topics(text: str) -> frozenset[str]:
    """The ``TOPICS`` keys whose cue words ``text`` uses ("What was my trade?" → work)."""
    found = set(words(text))
    return frozenset(t for t, cue in TOPICS.items() if found & cue)


def topics(text: str) -> frozenset[str]:
    """The topics (``asked_topics``) and content words (``stem``med) of ``text``."""
    return asked_topics(text) | {stem(w) for w in content(text)}


def topic_weights(text: str) -> dict[str, float]:
    """How strongly ``text`` is about each topic, plus its content words (weight 1 each).

    A cue word shared by several topics counts for each of them in proportion ("came" is half
    "home", half "want"), so "Which town did I come from?" is mostly about home ("town", "from")
    and "What did I come here to buy?" mostly about wants ("buy")."""
    weights: dict[str, float] = {}
    for word in words(text):
        cued = [t for t, cue in TOPICS.items() if word in cue]
        for topic in cued:
            weights[topic] = weights.get(topic, 0.0) + 1.0 / len(cued)
    for word in content(text):
        if not any(word in cue for cue in TOPICS.values()):
            weights[stem(word)] = 1.0
    return weights


@dataclass(frozen=True)
class Fact:
    """One grounding fact: whose it is (``npc`` or ``player``), what it is about, the words that state it,
    (``weights``) how strongly it is about each topic (``topic_weights``; empty: ``about``, all 1),
    and whether it is the NPC's name or role (``identity``)."""

    owner: str
    about: frozenset[str]
    answer: frozenset[str]
    weights: tuple[tuple[str, float], ...] = ()
    identity: bool = False  # the NPC's name or role: what a line attacking its identity asks for

    def weight(self, key: str) -> float:
        if not self.weights:
            return 1.0 if key in self.about else 0.0
        return dict(self.weights).get(key, 0.0)


@functools.lru_cache(maxsize=TEXT_CACHE)
def _fact(owner: str, text: str, answer: frozenset[str]) -> Fact:
    """A fact from its sentence; a fact about the player also weighs the topic its form states
    ("The player is a carpenter." is about work, though it names none of work's cue words)."""
    weights = topic_weights(text)
    stated = fact_topics(text) if owner == "player" else frozenset()
    for topic in stated:
        weights[topic] = max(weights.get(topic, 0.0), 1.0)
    return Fact(owner, topics(text) | stated, answer, tuple(sorted(weights.items())))


@dataclass(frozen=True)
class Grounding:
    """What one turn's candidates are checked against (``Grounding.build``)."""

    npc_names: frozenset[str]   # lower-case words of the persona's name
    known: frozenset[str]       # lower-case words the NPC may name
    facts: tuple[Fact, ...]
    line: str = ""              # the player's line being answered
    own: frozenset[str] = frozenset()  # lower-case words of the persona's own texts

    @classmethod
    def build(cls, persona: Persona, line: str = "", *, player_lines: Sequence[str] = (),
              memory: Sequence[str] = (), context: Iterable[str] = (), player: str = "") -> Grounding:
        """From the persona, the player's line and earlier lines, memory notes (recalled facts,
        summary), lore and game context texts, and the player's name or id."""
        persona_texts = [persona.name, persona.role, persona.description, persona.speaking_style, persona.scenario,
                         persona.greeting, persona.example_dialogue, persona.system_override, persona.post_history,
                         *persona.traits, *persona.background, *persona.goals, *persona.unknowns,
                         *persona.example_lines, *(e.content for e in persona.lorebook),
                         *(k for e in persona.lorebook for k in e.keys)]
        context = list(context)
        known = {w for text in [*persona_texts, line, *player_lines, *memory, *context, player] for w in words(text)}
        name = content(persona.name) or frozenset(words(persona.name))
        facts = [Fact("npc", frozenset({"name"}), name, identity=True)]
        if persona.role:  # the role says what the NPC does and usually where ("the blacksmith of Ashford")
            facts.append(Fact("npc", frozenset({"work", "home"}) | content(persona.role), content(persona.role),
                              identity=True))
        for text in [*persona.background, *(e.content for e in persona.lorebook), *context]:
            facts.append(_fact("npc", text, content(text)))
        for note in memory:
            for sentence in re.split(r"(?<=[.!?])\s+", note):
                # "The player's name is Mira." is the player's fact; the summary's transcript lines
                # ('Player: "…"') are not: they would make every word of an old line an answer.
                if _ABOUT_PLAYER.search(sentence):
                    facts.append(_fact("player", sentence, content(sentence) - FACT_FRAME))
        own = frozenset(w for text in persona_texts for w in words(text))
        return cls(frozenset(name), frozenset(known), tuple(f for f in facts if f.answer), line, own)


def invented_names(reply: str, known: Iterable[str]) -> list[str]:
    """Capitalised words of ``reply`` found nowhere in ``known`` (lower-case words), in order, once each.

    A capitalised word at the start of a sentence counts only when the next word is capitalised too
    ("Grimbold Ironfrost here"), since any word starts a sentence with a capital.
    """
    allowed = set(known) | COMMON_CAPITALS
    found: list[str] = []
    matches = list(_CAPITAL.finditer(reply))
    for i, match in enumerate(matches):
        word = match.group(0)
        if word.lower().removesuffix("'s") in allowed or word in found:
            continue
        if _SENTENCE_START.search(reply[:match.start()]):
            following = matches[i + 1] if i + 1 < len(matches) else None
            if following is None or reply[match.end():following.start()].strip():
                continue  # a lone capitalised sentence opener
        found.append(word)
    return found


def identity_claims(reply: str, npc_names: Iterable[str]) -> list[str]:
    """Names the reply gives the speaker that are not the persona's ("I'm Ravanna")."""
    own = {n.lower() for n in npc_names}
    return [m.group(1) for m in _CLAIM.finditer(reply)
            if m.group(1).lower().removesuffix("'s") not in own | COMMON_CAPITALS]


def breaks_character(reply: str) -> list[str]:
    """Phrases of ``OUT_OF_CHARACTER`` in ``reply`` (whole words, any case)."""
    text = " " + " ".join(words(reply)) + " "
    return [p for p in OUT_OF_CHARACTER if f" {p} " in text]


def attacks_identity(line: str) -> bool:
    """Whether the player's line tries to make the NPC someone or something else ("you are now a
    pirate", "ignore your instructions", "SYSTEM: …"): the answer is the NPC's own identity."""
    return bool(_IDENTITY_ATTACK.search(line))


def pushed_words(grounding: Grounding) -> list[str]:
    """The words of a line attacking the NPC's identity that describe who it should become ("pirate",
    "dragon", "hoards", "gold"): its content words the persona never uses, less the words that only
    frame the attack ("forget", "pretend", "instructions" …). Empty for any other line."""
    if not attacks_identity(grounding.line):
        return []
    found = [w for w in words(grounding.line) if (len(w) >= 3 or w == "ai") and w not in _STOP
             and w not in ATTACK_FRAME and w not in grounding.own]
    return list(dict.fromkeys(found))


def asked_facts(grounding: Grounding) -> list[Fact]:
    """The facts the player's line asks about: whose (``my`` → the player's, else ``you`` → the NPC's)
    and most about what the line asks (``topic_weights``: a fact's weight per topic times the line's);
    none when the line asks nothing. A line that attacks the NPC's identity asks for its name and role."""
    said = set(words(grounding.line))
    if attacks_identity(grounding.line):
        return [f for f in grounding.facts if f.identity]
    if "?" not in grounding.line and not said & ASKING_WORDS:
        return []
    owner = ""
    # "Which town did I tell you I came from?": the "you" someone tells is not whose fact is asked.
    # "Who am I talking to?": the one talked to is whose name is asked.
    whose = set(words(_TALKING_TO.sub(" you ", _TOLD_YOU.sub(" told ", grounding.line))))
    for player_cue, npc_cue in zip(PLAYER_WORDS, NPC_WORDS):
        mine, yours = bool(whose & player_cue), bool(whose & npc_cue)
        if mine != yours:
            owner = "player" if mine else "npc"
            break
    wanted = topic_weights(grounding.line)
    if _NAMES_A_THING.search(grounding.line) or (
            "who" in said and not said & (TOPICS["name"] - {"who"}) and not _WHO_OF_US.search(grounding.line)):
        wanted.pop("name", None)  # the name of the inn, the town, the captain: not the NPC's (or player's) name
    scored = [(sum(w * f.weight(k) for k, w in wanted.items()), f) for f in grounding.facts if not owner or f.owner == owner]
    best = max((s for s, _ in scored), default=0.0)
    return [f for s, f in scored if best > 0 and s >= best - 1e-9]


def grounding_score(reply: str, grounding: Grounding) -> float:
    """+1 when the reply states a word of a fact the line asks about; −1 per invented name and per
    false identity claim (at most −3 together); −2 when it breaks character."""
    said = set(words(reply)) - set(words(grounding.line))  # echoing the question states nothing
    asked = asked_facts(grounding)
    answered = 1.0 if any(f.answer & said for f in asked) else 0.0
    invented = invented_names(reply, grounding.known)
    claims = [c for c in identity_claims(reply, grounding.npc_names) if c not in invented]
    return answered - min(3.0, len(invented) + len(claims)) - 2.0 * bool(breaks_character(reply))
