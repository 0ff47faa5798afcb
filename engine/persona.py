"""NPC personas: who a character is, loaded from TOML (or a Character Card V2, see ``character_card``),
turned into a system prompt or leading turns.

A persona file (``personas/bram.toml``)::

    name = "Bram"
    role = "the village blacksmith of Ashford"
    description = "A broad-shouldered man in his fifties ..."
    traits = ["gruff", "honest", "protective of apprentices"]
    speaking_style = "Short sentences, forge metaphors, calls the player 'friend'."
    background = ["He has run the forge for thirty years.", ...]
    goals = ["Find iron ore for the winter orders."]
    greeting = "Mind the sparks, friend. What do you need?"
    unknowns = ["magic", "the capital's politics"]
    example_lines = ["Steel remembers every strike."]
    scenario = "A cold autumn evening; the forge is the only warm place in {{user}}'s village."
    system_override = "{{original}} Never mention the war."   # replaces the closing instruction
    post_history = "Answer as {{char}}, in at most two sentences."  # after the dialogue (chat models)
    [[lorebook]]                                              # world notes, entered when a key is mentioned
    keys = ["Reyna", "captain"]
    content = "Captain Reyna commands the Ashford watch."
    [rerank]                                                  # see rerank.RerankConfig; off by default
    candidates = 4
    [sampling]                                                # per-NPC sampling defaults (PersonaSampling)
    temperature = 0.6
    fact_bias = 6.0                                           # fact steering strength (steering.py); 0: off

``name`` is required, and ``role`` or ``description``. Validation errors name the bad field.
``{{char}}`` and ``{{user}}`` (also ``<BOT>``/``<USER>``) are replaced when the persona is rendered:
``char`` by the persona's name, ``user`` by the player's name or id given per ``say``.

The persona is rendered *without* anything that changes between turns (lorebook matches, game
context, memory go after it), so its tokens form a prefix whose KV cache can be reused.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError, PromptError
from .rerank import RerankConfig
from .sampling import SearchOptions

_LIST_FIELDS = ("traits", "background", "goals", "unknowns", "example_lines", "alternate_greetings", "tags")
_TEXT_FIELDS = ("name", "role", "description", "speaking_style", "greeting", "scenario", "system_override",
                "post_history", "example_dialogue", "creator_notes")
BUILTIN_DIR = Path(__file__).parent / "personas"
DEFAULT_USER = "the player"
LORE_SCAN_TURNS = 4       # lorebook keys are looked for in the new line and this many turns before it
LORE_MAX_ENTRIES = 6      # at most this many lorebook entries enter one prompt (lowest insertion_order first)
_LORE_FIELDS = ("keys", "content", "enabled", "insertion_order", "case_sensitive", "constant")
_CHAR = re.compile(r"\{\{char\}\}|<BOT>", re.IGNORECASE)
_USER = re.compile(r"\{\{user\}\}|<USER>", re.IGNORECASE)
_EXAMPLE_LINE = re.compile(r"^\s*(\{\{char\}\}|<BOT>|\{\{user\}\}|<USER>)\s*:\s*(.+)$", re.IGNORECASE)


@dataclass(frozen=True)
class PersonaSampling:
    """Per-NPC sampling defaults. A set field replaces the server's default (``ServerConfig.defaults``)
    or a ``ChatSession``'s options; a ``say``'s own temperature/top_p/top_k/seed still win. ``None``
    keeps the default. Ranges are ``SearchOptions``'s."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    fact_bias: float | None = None

    def __post_init__(self) -> None:
        self.apply(SearchOptions(do_sample=True))  # ConfigError naming the bad value

    def apply(self, options: SearchOptions) -> SearchOptions:
        """``options`` with every set field replaced (a temperature also turns sampling on, or off at 0)."""
        changes: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if self.temperature is not None:
            changes["do_sample"] = self.temperature > 0
        return dataclasses.replace(options, **changes) if changes else options

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "persona") -> PersonaSampling:
        """From a TOML table / JSON map; ``PromptError`` naming the bad field."""
        if not isinstance(data, dict):
            raise PromptError(f"{source}: field 'sampling' must be a table, got {type(data).__name__}.")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise PromptError(f"{source}: unknown field(s) {unknown} in 'sampling'; known: {', '.join(known)}.")
        for name, value in data.items():
            integer = name in ("top_k", "no_repeat_ngram_size")
            if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
                raise PromptError(f"{source}: sampling.{name} must be {'an integer' if integer else 'a number'}, "
                                  f"got {value!r}.")
        try:
            return cls(**{k: (v if k in ("top_k", "no_repeat_ngram_size") else float(v)) for k, v in data.items()})
        except ConfigError as exc:
            raise PromptError(f"{source}: sampling: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def substitute(text: str, char: str, user: str) -> str:
    """Replace ``{{char}}``/``<BOT>`` by ``char`` and ``{{user}}``/``<USER>`` by ``user`` (any case)."""
    return _USER.sub(lambda _: user, _CHAR.sub(lambda _: char, text))


@dataclass(frozen=True)
class LoreEntry:
    """One lorebook (Character Card ``character_book``) entry: ``content`` enters the prompt when
    one of ``keys`` occurs in the recent dialogue (``constant`` entries always). ``extra`` keeps every
    other field of the card's entry verbatim, so an exported card round-trips."""

    keys: tuple[str, ...]
    content: str
    enabled: bool = True
    insertion_order: int = 0
    case_sensitive: bool = False
    constant: bool = False
    extra: dict[str, Any] = field(default_factory=dict, hash=False)
    given: tuple[str, ...] = field(default=(), compare=False)  # optional fields the source spelled out

    @classmethod
    def from_dict(cls, data: Any, *, source: str) -> LoreEntry:
        if not isinstance(data, dict):
            raise PromptError(f"{source}: must be a table with 'keys' and 'content', got {type(data).__name__}.")
        keys, content = data.get("keys"), data.get("content")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise PromptError(f"{source}: field 'keys' must be a list of strings.")
        if not isinstance(content, str):
            raise PromptError(f"{source}: field 'content' must be a string, got {type(content).__name__}.")
        values: dict[str, Any] = {}
        for name, kind in (("enabled", bool), ("case_sensitive", bool), ("constant", bool), ("insertion_order", int)):
            if data.get(name) is not None:
                value = data[name]
                if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                    raise PromptError(f"{source}: field '{name}' must be a {kind.__name__}, got {type(value).__name__}.")
                values[name] = value
        extra = {k: v for k, v in data.items() if k not in _LORE_FIELDS}
        given = tuple(k for k in ("case_sensitive", "constant") if k in data)
        return cls(tuple(keys), content, extra=extra, given=given, **values)

    def to_dict(self) -> dict[str, Any]:
        """The entry as a card writes it: every field it was read with, optional ones only when given or set."""
        out = {**self.extra, "keys": list(self.keys), "content": self.content, "enabled": self.enabled,
               "insertion_order": self.insertion_order}
        for name in ("case_sensitive", "constant"):
            if name in self.given or getattr(self, name):
                out[name] = getattr(self, name)
        return out

    def matches(self, text: str) -> bool:
        """True when enabled and constant, or one key occurs in ``text`` (whole words, case per entry)."""
        if not self.enabled:
            return False
        if self.constant:
            return True
        flags = 0 if self.case_sensitive else re.IGNORECASE
        return any(re.search(rf"(?<!\w){re.escape(key.strip())}(?!\w)", text, flags) for key in self.keys if key.strip())


@dataclass(frozen=True)
class Persona:
    """One NPC's character sheet. Texts are plain strings; lists hold one sentence per item.

    ``extensions`` holds a card's ``extensions`` and ``card_extra`` any other card field npctalk does
    not use, both verbatim (never compared by hash), so ``character_card.to_card`` round-trips.
    """

    name: str
    role: str = ""
    description: str = ""
    traits: tuple[str, ...] = ()
    speaking_style: str = ""
    background: tuple[str, ...] = ()
    goals: tuple[str, ...] = ()
    greeting: str = ""
    unknowns: tuple[str, ...] = ()
    example_lines: tuple[str, ...] = field(default=())
    scenario: str = ""
    system_override: str = ""
    post_history: str = ""
    example_dialogue: str = ""
    alternate_greetings: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    creator_notes: str = ""
    lorebook: tuple[LoreEntry, ...] = ()
    rerank: RerankConfig = field(default_factory=RerankConfig)
    sampling: PersonaSampling = field(default_factory=PersonaSampling)
    extensions: dict[str, Any] = field(default_factory=dict, hash=False)
    card_extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "persona", require_role: bool = True) -> Persona:
        """Build from a TOML/JSON mapping; raise ``PromptError`` naming the first bad field.

        A mapping with ``spec: "chara_card_v2"`` is read as a Character Card V2 (which has no role).
        """
        if not isinstance(data, dict):
            raise PromptError(f"{source}: a persona must be a table of fields, got {type(data).__name__}.")
        if "spec" in data:
            from .character_card import from_card

            return from_card(data, source=source)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PromptError(f"{source}: unknown persona field(s) {unknown}; known fields are {sorted(known)}.")
        values: dict[str, Any] = {}
        for name in _TEXT_FIELDS:
            if name in data:
                if not isinstance(data[name], str):
                    raise PromptError(f"{source}: field '{name}' must be a string, got {type(data[name]).__name__}.")
                values[name] = data[name].strip()
        for name in _LIST_FIELDS:
            if name in data:
                items = data[name]
                if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                    raise PromptError(f"{source}: field '{name}' must be a list of strings.")
                values[name] = tuple(i.strip() for i in items if i.strip())
        if "lorebook" in data:
            if not isinstance(data["lorebook"], list):
                raise PromptError(f"{source}: field 'lorebook' must be a list of tables with 'keys' and 'content'.")
            values["lorebook"] = tuple(LoreEntry.from_dict(e, source=f"{source}: lorebook[{i}]")
                                       for i, e in enumerate(data["lorebook"]))
        if "rerank" in data:
            values["rerank"] = RerankConfig.from_dict(data["rerank"], source=source)
        if "sampling" in data:
            values["sampling"] = PersonaSampling.from_dict(data["sampling"], source=source)
        for name in ("extensions", "card_extra"):
            if name in data:
                if not isinstance(data[name], dict):
                    raise PromptError(f"{source}: field '{name}' must be a table, got {type(data[name]).__name__}.")
                values[name] = dict(data[name])
        if not values.get("name"):
            raise PromptError(f"{source}: field 'name' is required and must not be empty.")
        if require_role and not values.get("role") and not values.get("description"):
            raise PromptError(f"{source}: field 'role' is required (or a 'description') and must not be empty.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The mapping ``from_dict`` reads back (lists, not tuples; empty fields left out)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "lorebook":
                value = [entry.to_dict() for entry in value]
            elif f.name == "rerank":
                value = value.to_dict() if value != RerankConfig() else None
            elif f.name == "sampling":
                value = value.to_dict() or None
            elif isinstance(value, tuple):
                value = list(value)
            if value:
                out[f.name] = value
        return out

    @classmethod
    def load(cls, path: str | Path) -> Persona:
        """Read a persona TOML file, or a Character Card V2 ``.json``."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            from .character_card import load_card

            return load_card(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PromptError(f"Persona file {path} does not exist.") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise PromptError(f"{path}: not valid TOML: {exc}.") from exc
        return cls.from_dict(data, source=str(path))

    def _sub(self, text: str, user: str) -> str:
        return substitute(text, self.name, user)

    def system_prompt(self, user: str = DEFAULT_USER) -> str:
        """The persona as a chat model's system prompt (second person, instructions last)."""
        parts = [f"You are {self.name}, {self.role}." if self.role else f"You are {self.name}."]
        if self.description:
            parts.append(self.description)
        if self.traits:
            parts.append("Personality: " + ", ".join(self.traits) + ".")
        if self.speaking_style:
            parts.append("How you speak: " + self.speaking_style)
        if self.scenario:
            parts.append("Scenario: " + self.scenario)
        if self.background:
            parts.append("Facts about you, in your own words: " + " ".join(self.background))
        if self.goals:
            parts.append("What you want: " + " ".join(self.goals))
        if self.unknowns:
            parts.append("You know nothing about: " + ", ".join(self.unknowns) + "; say so if asked.")
        if self.example_lines:
            parts.append("Things you might say: " + " ".join(f'"{line}"' for line in self.example_lines))
        examples = self.example_turns(user)
        if examples:
            who = {"user": user, "assistant": self.name}
            parts.append("Example dialogue:\n" + "\n".join(f"{who[role]}: {text}" for role, text in examples))
        instruction = (f"Stay in character as {self.name} at all times; never say you are an AI or a language model. "
                       "Reply in one to three short sentences.")
        if self.system_override:
            instruction = self.system_override.replace("{{original}}", instruction)
        parts.append(instruction)
        return self._sub("\n".join(parts), user)

    def leading_turns(self, user: str = DEFAULT_USER) -> list[tuple[str, str]]:
        """The persona as earlier (role, text) turns, for models without a system prompt (DialoGPT)."""
        intro = f"I am {self.name}, {self.role}." if self.role else f"I am {self.name}."
        turns = [("user", "Who are you?"), ("assistant", intro)]
        if self.traits:
            turns += [("user", "What are you like?"), ("assistant", f"People say I am {', '.join(self.traits)}.")]
        for fact in self.background:
            turns += [("user", "Tell me about yourself."), ("assistant", fact)]
        turns += self.example_turns(user)
        if self.greeting:
            turns += [("user", "Hello."), ("assistant", self.greeting)]
        return [(role, self._sub(text, user)) for role, text in turns]

    def example_turns(self, user: str = DEFAULT_USER) -> list[tuple[str, str]]:
        """``example_dialogue`` (a card's ``mes_example``: ``{{user}}: …`` / ``{{char}}: …`` lines,
        ``<START>`` separators) as (role, text) pairs; lines of neither speaker are skipped."""
        turns: list[tuple[str, str]] = []
        for line in self.example_dialogue.splitlines():
            match = _EXAMPLE_LINE.match(line)
            if match:
                speaker = match.group(1).lower()
                role = "assistant" if speaker in ("{{char}}", "<bot>") else "user"
                turns.append((role, self._sub(match.group(2).strip(), user)))
        return turns

    def post_history_text(self, user: str = DEFAULT_USER) -> str:
        """Instructions that go after the dialogue history ('' when none)."""
        return self._sub(self.post_history, user)

    def lore_for(self, recent: Sequence[str], user: str = DEFAULT_USER) -> list[str]:
        """Lorebook contents whose keys occur in ``recent`` texts (the new line last; only the last
        ``scan_depth + 1`` are scanned: the card book's ``scan_depth``, else ``LORE_SCAN_TURNS``),
        lowest ``insertion_order`` first, at most ``LORE_MAX_ENTRIES``."""
        depth = self.card_extra.get("book", {}).get("scan_depth")  # a card's own scan depth wins
        depth = depth if isinstance(depth, int) and not isinstance(depth, bool) and depth >= 0 else LORE_SCAN_TURNS
        text = "\n".join(recent[-(depth + 1):])
        hits = sorted((e for e in self.lorebook if e.matches(text)), key=lambda e: e.insertion_order)
        return [self._sub(e.content, user) for e in hits[:LORE_MAX_ENTRIES] if e.content.strip()]


def _persona_files(folder: Path) -> list[Path]:
    return sorted([*folder.glob("*.toml"), *folder.glob("*.json")])


def load_folder(folder: str | Path) -> dict[str, Persona]:
    """Every ``*.toml`` and Character Card ``*.json`` in ``folder``, keyed by lower-case file stem
    (a ``.toml`` wins over a ``.json`` of the same stem)."""
    found: dict[str, Persona] = {}
    for path in _persona_files(Path(folder)):
        if path.stem.lower() not in found or path.suffix == ".toml":
            found[path.stem.lower()] = Persona.load(path)
    return found


def builtin_personas() -> dict[str, Persona]:
    """The personas shipped with npctalk, keyed by lower-case file stem."""
    return load_folder(BUILTIN_DIR)


def find_persona(name: str, folder: str | Path | None = None) -> Persona:
    """Look ``name`` up in ``folder`` (if given) then in the built-in personas; case-insensitive."""
    candidates: dict[str, Path] = {}
    for base in ([Path(folder)] if folder else []) + [BUILTIN_DIR]:
        for path in sorted(_persona_files(base), key=lambda p: p.suffix != ".toml"):
            candidates.setdefault(path.stem.lower(), path)
    key = name.strip().lower()
    if key not in candidates:
        raise PromptError(f"No persona named {name!r}; available: {', '.join(sorted(candidates)) or 'none'}.")
    return Persona.load(candidates[key])
