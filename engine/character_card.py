"""Character Card V2 (``spec: "chara_card_v2"``) ⇄ ``Persona``.

A card is ``{"spec": "chara_card_v2", "spec_version": "2.0", "data": {...}}``; its fields map as::

    name                       → name
    description                → description
    personality                → traits (one item; exported traits are joined with ", ")
    scenario                   → scenario
    first_mes                  → greeting
    mes_example                → example_dialogue ({{user}}: / {{char}}: lines, <START> separators)
    system_prompt              → system_override ({{original}} = npctalk's own closing instruction)
    post_history_instructions  → post_history
    alternate_greetings, tags, creator_notes → the same names
    character_book.entries     → lorebook (each entry's other fields kept in LoreEntry.extra)
    extensions                 → extensions, verbatim; ``extensions.npctalk`` may carry persona fields
                                 a card has no slot for (role, background, goals, speaking_style,
                                 unknowns, example_lines, rerank, sampling) and is applied on import
    anything else (creator, character_version, unknown fields, top-level V1 copies) → card_extra

``to_card(from_card(card)) == card`` for a card that spells out the V2 fields; a TOML persona
exported with ``to_card`` and read back is the same persona. Errors name the bad field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import PromptError
from .persona import LoreEntry, Persona

SPEC = "chara_card_v2"
SPEC_VERSION = "2.0"
_TEXT = {"name": "name", "description": "description", "scenario": "scenario", "first_mes": "greeting",
         "mes_example": "example_dialogue", "system_prompt": "system_override",
         "post_history_instructions": "post_history", "creator_notes": "creator_notes"}
_LISTS = {"alternate_greetings": "alternate_greetings", "tags": "tags"}
_DATA_FIELDS = (*_TEXT, *_LISTS, "personality", "character_book", "extensions")
_NPCTALK_FIELDS = ("role", "traits", "background", "goals", "speaking_style", "unknowns", "example_lines", "rerank",
                   "sampling")
EXTENSION_KEY = "npctalk"


def from_card(card: Any, *, source: str = "character card") -> Persona:
    """A ``Persona`` from a parsed Character Card V2; ``PromptError`` naming the first bad field."""
    if not isinstance(card, dict):
        raise PromptError(f"{source}: a character card must be a JSON object, got {type(card).__name__}.")
    if card.get("spec") != SPEC:
        raise PromptError(f"{source}: field 'spec' must be {SPEC!r} (Character Card V2), got {card.get('spec')!r}.")
    data = card.get("data")
    if not isinstance(data, dict):
        raise PromptError(f"{source}: field 'data' must be an object holding the character, got {type(data).__name__}.")
    values: dict[str, Any] = {}
    for key, name in _TEXT.items():
        value = data.get(key, "")
        if not isinstance(value, str):
            raise PromptError(f"{source}: field 'data.{key}' must be a string, got {type(value).__name__}.")
        values[name] = value
    personality = data.get("personality", "")
    if not isinstance(personality, str):
        raise PromptError(f"{source}: field 'data.personality' must be a string, got {type(personality).__name__}.")
    values["traits"] = [personality] if personality.strip() else []
    for key, name in _LISTS.items():
        items = data.get(key, [])
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise PromptError(f"{source}: field 'data.{key}' must be a list of strings.")
        values[name] = items
    extensions = data.get("extensions", {})
    if not isinstance(extensions, dict):
        raise PromptError(f"{source}: field 'data.extensions' must be an object, got {type(extensions).__name__}.")
    ours = extensions.get(EXTENSION_KEY, {})
    if not isinstance(ours, dict) or sorted(set(ours) - set(_NPCTALK_FIELDS)):
        raise PromptError(f"{source}: field 'data.extensions.{EXTENSION_KEY}' must be an object with only "
                          f"{list(_NPCTALK_FIELDS)}.")
    values.update(ours)  # npctalk's own fields (a list of traits among them) win over the card's
    values["extensions"] = {k: v for k, v in extensions.items() if k != EXTENSION_KEY}
    extra: dict[str, Any] = {"data": {k: v for k, v in data.items() if k not in _DATA_FIELDS},
                             "top": {k: v for k, v in card.items() if k not in ("spec", "data")
                                     and (k, v) != ("spec_version", SPEC_VERSION)}}
    book = data.get("character_book")
    if book is not None:
        if not isinstance(book, dict) or not isinstance(book.get("entries"), list):
            raise PromptError(f"{source}: field 'data.character_book' must be an object with a list 'entries'.")
        values["lorebook"] = [_entry(e, f"{source}: data.character_book.entries[{i}]") for i, e in enumerate(book["entries"])]
        extra["book"] = {k: v for k, v in book.items() if k != "entries"}
    values["card_extra"] = {k: v for k, v in extra.items() if v or k == "book"}
    if not values["name"].strip():
        raise PromptError(f"{source}: field 'data.name' is required and must not be empty.")
    # A card has no role; its description (possibly empty) says who the character is.
    return Persona.from_dict({k: v for k, v in values.items() if v}, source=source, require_role=False)


def _entry(data: Any, source: str) -> dict[str, Any]:
    entry = LoreEntry.from_dict(data, source=source)  # validates, names the bad field
    return entry.to_dict()


def to_card(persona: Persona) -> dict[str, Any]:
    """The persona as a Character Card V2 (every V2 field present, as the spec asks)."""
    extra = persona.card_extra
    ours = {k: v for k, v in persona.to_dict().items() if k in _NPCTALK_FIELDS}
    if len(persona.traits) == 1:
        del ours["traits"]  # a single item round-trips through personality
    extensions = dict(persona.extensions)
    if ours:
        extensions[EXTENSION_KEY] = ours
    data: dict[str, Any] = {"name": persona.name, "description": persona.description,
                            "personality": ", ".join(persona.traits)}
    for key, name in _TEXT.items():
        if key != "name" and key != "description":
            data[key] = getattr(persona, name)
    for key, name in _LISTS.items():
        data[key] = list(getattr(persona, name))
    data.update({"creator": "", "character_version": ""})
    data.update(extra.get("data", {}))
    data["extensions"] = extensions
    if persona.lorebook or "book" in extra:
        data["character_book"] = {**extra.get("book", {}), "entries": [e.to_dict() for e in persona.lorebook]}
    return {"spec": SPEC, "spec_version": SPEC_VERSION, **extra.get("top", {}), "data": data}


def load_card(path: str | Path) -> Persona:
    """Read a Character Card V2 ``.json`` file (PNG cards: extract the ``chara`` text chunk first)."""
    path = Path(path)
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptError(f"Character card {path} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PromptError(f"{path}: not valid JSON: {exc}.") from exc
    return from_card(card, source=str(path))
