"""NPC personas: who a character is, loaded from TOML, turned into a system prompt or leading turns.

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

Only ``name`` and ``role`` are required. Validation errors name the bad field.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import PromptError

_LIST_FIELDS = ("traits", "background", "goals", "unknowns", "example_lines")
_TEXT_FIELDS = ("name", "role", "description", "speaking_style", "greeting")
BUILTIN_DIR = Path(__file__).parent / "personas"


@dataclass(frozen=True)
class Persona:
    """One NPC's character sheet. Texts are plain strings; lists hold one sentence per item."""

    name: str
    role: str
    description: str = ""
    traits: tuple[str, ...] = ()
    speaking_style: str = ""
    background: tuple[str, ...] = ()
    goals: tuple[str, ...] = ()
    greeting: str = ""
    unknowns: tuple[str, ...] = ()
    example_lines: tuple[str, ...] = field(default=())

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "persona") -> Persona:
        """Build from a TOML/JSON mapping; raise ``PromptError`` naming the first bad field."""
        if not isinstance(data, dict):
            raise PromptError(f"{source}: a persona must be a table of fields, got {type(data).__name__}.")
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
        for name in ("name", "role"):
            if not values.get(name):
                raise PromptError(f"{source}: field '{name}' is required and must not be empty.")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> Persona:
        """Read a persona TOML file."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PromptError(f"Persona file {path} does not exist.") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise PromptError(f"{path}: not valid TOML: {exc}.") from exc
        return cls.from_dict(data, source=str(path))

    def system_prompt(self) -> str:
        """The persona as a chat model's system prompt (second person, instructions last)."""
        parts = [f"You are {self.name}, {self.role}."]
        if self.description:
            parts.append(self.description)
        if self.traits:
            parts.append("Personality: " + ", ".join(self.traits) + ".")
        if self.speaking_style:
            parts.append("How you speak: " + self.speaking_style)
        if self.background:
            parts.append("Facts about you, in your own words: " + " ".join(self.background))
        if self.goals:
            parts.append("What you want: " + " ".join(self.goals))
        if self.unknowns:
            parts.append("You know nothing about: " + ", ".join(self.unknowns) + "; say so if asked.")
        if self.example_lines:
            parts.append("Things you might say: " + " ".join(f'"{line}"' for line in self.example_lines))
        parts.append(
            f"Stay in character as {self.name} at all times; never say you are an AI or a language model. "
            "Reply in one to three short sentences."
        )
        return "\n".join(parts)

    def leading_turns(self) -> list[tuple[str, str]]:
        """The persona as earlier (role, text) turns, for models without a system prompt (DialoGPT)."""
        turns = [("user", "Who are you?"), ("assistant", f"I am {self.name}, {self.role}.")]
        if self.traits:
            turns += [("user", "What are you like?"), ("assistant", f"People say I am {', '.join(self.traits)}.")]
        for fact in self.background:
            turns += [("user", "Tell me about yourself."), ("assistant", fact)]
        if self.greeting:
            turns += [("user", "Hello."), ("assistant", self.greeting)]
        return turns


def builtin_personas() -> dict[str, Persona]:
    """The personas shipped with npctalk, keyed by lower-case file stem."""
    return {p.stem.lower(): Persona.load(p) for p in sorted(BUILTIN_DIR.glob("*.toml"))}


def find_persona(name: str, folder: str | Path | None = None) -> Persona:
    """Look ``name`` up in ``folder`` (if given) then in the built-in personas; case-insensitive."""
    candidates: dict[str, Path] = {}
    for base in ([Path(folder)] if folder else []) + [BUILTIN_DIR]:
        for path in sorted(base.glob("*.toml")):
            candidates.setdefault(path.stem.lower(), path)
    key = name.strip().lower()
    if key not in candidates:
        raise PromptError(f"No persona named {name!r}; available: {', '.join(sorted(candidates)) or 'none'}.")
    return Persona.load(candidates[key])
