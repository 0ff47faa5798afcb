"""Prompt/completion dialogue examples in JSONL, one example per line. Torch-free.

A line (only ``prompt`` and ``completion`` are required)::

    {"persona": "bram",                                  # built-in or <dataset>/personas/<name>.toml,
                                                         # or an inline persona table
     "context": {"location": "the forge"},               # game state, as a server `say` passes it
     "history": [{"role": "user", "text": "Hello."},     # earlier turns, oldest first
                 {"role": "assistant", "text": "Mind the sparks."}],
     "prompt": "Got any iron?",                          # the player's line
     "completion": "Not a scrap, friend. The mine's flooded."}  # the NPC's reply: the training target

Blank lines are skipped. Anything else that is wrong raises ``DatasetError`` starting with
``file:line`` and saying what to fix; nothing is silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npctalk.engine.dialogue import Turn
from npctalk.engine.errors import PromptError
from npctalk.engine.persona import Persona, find_persona

from .errors import DatasetError

FIELDS = ("persona", "context", "history", "prompt", "completion")
PERSONAS_FOLDER = "personas"  # next to the JSONL files: extra persona .toml files of the dataset


@dataclass(frozen=True)
class Example:
    """One training/evaluation example. ``where`` is ``file:line`` for messages."""

    prompt: str
    completion: str
    persona: Persona | None = None
    history: tuple[Turn, ...] = ()
    context: Mapping[str, Any] = field(default_factory=dict)
    where: str = "<memory>"


def load_examples(path: str | Path, personas_dir: str | Path | None = None) -> list[Example]:
    """Read a JSONL file. Persona names resolve in ``personas_dir`` (default: ``<file's folder>/personas``)
    then among the built-ins. ``DatasetError`` names the file and line of the first problem."""
    path = Path(path)
    if personas_dir is None and (path.parent / PERSONAS_FOLDER).is_dir():
        personas_dir = path.parent / PERSONAS_FOLDER
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"Dataset file {path} does not exist.") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc}).") from exc
    cache: dict[str, Persona] = {}
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            examples.append(parse_line(line, f"{path}:{number}", personas_dir, cache))
    if not examples:
        raise DatasetError(f"{path} holds no examples (one JSON object per line expected).")
    return examples


def parse_line(line: str, where: str, personas_dir: str | Path | None = None,
               cache: dict[str, Persona] | None = None) -> Example:
    """One JSONL line → ``Example``; ``DatasetError`` prefixed with ``where`` when it is malformed."""
    def fail(why: str) -> DatasetError:
        return DatasetError(f"{where}: {why}")

    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise fail(f"not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object.") from None
    if not isinstance(data, dict):
        raise fail(f"expected a JSON object with 'prompt' and 'completion', got {type(data).__name__}.")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise fail(f"unknown field(s) {unknown}; known fields are {list(FIELDS)}.")
    texts = {}
    for name in ("prompt", "completion"):
        value = data.get(name)
        if not isinstance(value, str) or not value.strip():
            raise fail(f"'{name}' must be a non-empty string, got {value!r}.")
        texts[name] = value.strip()
    context = data.get("context", {})
    if not isinstance(context, dict):
        raise fail(f"'context' must be an object of game facts, got {type(context).__name__}.")
    return Example(
        prompt=texts["prompt"], completion=texts["completion"],
        persona=_persona(data.get("persona"), where, personas_dir, cache if cache is not None else {}),
        history=_history(data.get("history", []), fail), context=context, where=where,
    )


def _history(value: Any, fail: Any) -> tuple[Turn, ...]:
    if not isinstance(value, list):
        raise fail(f"'history' must be a list of {{'role', 'text'}} turns, got {type(value).__name__}.")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or set(turn) != {"role", "text"}:
            raise fail(f"history[{i}] must be an object with exactly 'role' and 'text', got {turn!r}.")
        if turn["role"] not in ("user", "assistant"):
            raise fail(f"history[{i}].role must be 'user' (player) or 'assistant' (NPC), got {turn['role']!r}.")
        if not isinstance(turn["text"], str) or not turn["text"].strip():
            raise fail(f"history[{i}].text must be a non-empty string.")
        turns.append(Turn(turn["role"], turn["text"].strip()))
    return tuple(turns)


def _persona(value: Any, where: str, folder: str | Path | None, cache: dict[str, Persona]) -> Persona | None:
    if value is None:
        return None
    try:
        if isinstance(value, str):
            key = value.strip().lower()
            if key not in cache:
                cache[key] = find_persona(value, folder)
            return cache[key]
        if isinstance(value, dict):
            return Persona.from_dict(value, source="inline persona")
    except PromptError as exc:
        raise DatasetError(f"{where}: {exc}") from None
    raise DatasetError(f"{where}: 'persona' must be a persona name or a persona object, got {type(value).__name__}.")
