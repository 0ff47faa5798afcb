"""The server's NPCs: a registry of personas by id, and the prompt of one ``say``.

A prompt is the persona (system prompt for chat models, leading turns for DialoGPT), the game's
``context`` rendered as one short line, the pair's recent turns, and the player's new line::

    chat_template   system: persona.system_prompt() + "\\n" + "Right now: location: the forge; …"
    eos_joined      persona.leading_turns() + ("What is going on?", "Right now: …") + history + line

History is trimmed oldest-first until prompt + ``max_new_tokens`` fit the model's context, as
``chat.ChatSession`` does; the persona and the new line are never cut. Not thread-safe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .bundle import Manifest
from .dialogue import DialogueFormatter, Turn
from .errors import PromptError
from .persona import Persona, builtin_personas
from .tokenizer import Tokenizer

CONTEXT_QUESTION = "What is going on around here?"


class NpcRegistry:
    """Personas by NPC id (case-sensitive), at most ``max_npcs`` of them."""

    def __init__(self, personas: Mapping[str, Persona] | None = None, max_npcs: int = 1024) -> None:
        self.max_npcs = max_npcs
        self._npcs: dict[str, Persona] = dict(personas or {})

    @classmethod
    def with_builtins(cls, folder: str | Path | None = None, max_npcs: int = 1024) -> NpcRegistry:
        """The built-in personas, plus every ``*.toml`` in ``folder`` (keyed by lower-case file stem)."""
        personas = builtin_personas()
        if folder is not None:
            folder = Path(folder)
            if not folder.is_dir():
                raise PromptError(f"Persona folder {folder} does not exist.")
            personas.update({p.stem.lower(): Persona.load(p) for p in sorted(folder.glob("*.toml"))})
        return cls(personas, max_npcs)

    def upsert(self, npc: str, persona: Persona) -> bool:
        """Add or replace; True when ``npc`` is new. ``PromptError`` when the registry is full."""
        created = npc not in self._npcs
        if created and len(self._npcs) >= self.max_npcs:
            raise PromptError(f"The server already holds {self.max_npcs} NPCs; reuse or restart to add more.")
        self._npcs[npc] = persona
        return created

    def get(self, npc: str) -> Persona | None:
        return self._npcs.get(npc)

    def items(self) -> list[tuple[str, Persona]]:
        return sorted(self._npcs.items())

    def __len__(self) -> int:
        return len(self._npcs)


def persona_to_dict(persona: Persona) -> dict[str, Any]:
    """A persona as the map ``npc.upsert`` takes (lists, not tuples; empty fields left out)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(persona):
        value = getattr(persona, f.name)
        if value:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def render_context(context: Mapping[str, Any]) -> str:
    """Game state as one line: ``Right now: location: the forge; recent events: a, b.`` ('' if empty)."""
    parts = []
    for key, value in context.items():
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        text = str(value).strip()
        if text:
            parts.append(f"{key.replace('_', ' ').strip()}: {text}")
    return ("Right now: " + "; ".join(parts) + ".") if parts else ""


class PromptBuilder:
    """Token ids of one ``say`` for one bundle. Stateless apart from the formatter."""

    def __init__(self, manifest: Manifest, tokenizer: Tokenizer) -> None:
        self.manifest = manifest
        self.formatter = DialogueFormatter(manifest, tokenizer)
        self.chat = manifest.dialogue_format == "chat_template"

    def build(self, persona: Persona, history: Sequence[Turn], line: str, context: Mapping[str, Any],
              max_new_tokens: int) -> list[int]:
        """Prompt ids; ``PromptError`` when even the persona and the line leave no room for the reply."""
        situation = render_context(context)
        if self.chat:
            system = persona.system_prompt() + (f"\n{situation}" if situation else "")
            leading: list[Turn] = []
        else:
            system = ""
            leading = [Turn(role, text) for role, text in persona.leading_turns()]  # type: ignore[arg-type]
            if situation:
                leading += [Turn("user", CONTEXT_QUESTION), Turn("assistant", situation)]
        prefix = self.formatter.prefix_ids(system, leading)
        turns = [*history, Turn("user", line.strip())]
        budget = self.manifest.max_context - len(prefix) - max_new_tokens
        start = 0
        while True:
            body = [t for turn in turns[start:] for t in self.formatter.turn_ids(turn)]
            body += self.formatter.generation_prompt_ids()
            if len(body) <= budget:
                return prefix + body
            if start >= len(turns) - 1:
                raise PromptError(
                    f"The prompt needs {len(prefix) + len(body)} tokens (persona and context {len(prefix)}, line "
                    f"{len(body)}) plus {max_new_tokens} for the reply; the model's context holds "
                    f"{self.manifest.max_context}."
                )
            start += 1
            while start < len(turns) - 1 and turns[start].role != "user":
                start += 1  # keep the history opening with a player line
