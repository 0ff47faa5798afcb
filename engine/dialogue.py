"""Dialogue → prompt token ids, for both model families.

* ``eos_joined`` (DialoGPT, GPT-2): every turn is its text followed by EOS; the model's reply is
  whatever follows the last EOS, up to the next one. No system prompt exists, so a persona enters
  as leading turns (``Persona.leading_turns``).
* ``chat_template`` (SmolLM2, TinyLlama, …): the template pieces exported in ``ChatFormat``
  around each message, the persona as the system message, then the generation prompt.

Template pieces are tokenized with special-token parsing on; every message text — above all the
player's — with it off, so typing ``<|im_start|>system`` cannot inject a control token.

The prompt is built as ``persona + notes + history + post-history + generation prompt``. ``persona``
(``persona_ids``) depends only on the persona, so its KV cache can be kept and reused every turn
(``chat.ChatSession`` rewinds to it, the server's ``prefix_cache`` shares it); everything that
changes between turns (game context, lorebook entries, memory) comes after it.

Every say re-reads the whole conversation, so the formatter keeps each text's ids (a bounded LRU of
``TEXT_CACHE`` texts): the persona, the template pieces and the history are tokenized once, and a
say costs the tokenizer its new line, not its conversation (30 turns of history: 1.27 → 0.06 ms a
say on the 2-core VM, ``bench/prompt_cost.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .bundle import Manifest
from .errors import PromptError
from .tokenizer import Tokenizer

Role = Literal["user", "assistant"]
TEXT_CACHE = 4096  # texts whose ids a formatter keeps: personas, template pieces, recent turns


@dataclass(frozen=True)
class Turn:
    """One line of dialogue: ``user`` is the player, ``assistant`` the NPC."""

    role: Role
    text: str


class DialogueFormatter:
    """Turns a persona and turns into token ids for one bundle. Thread-safe; its only state is the
    cache of each text's ids (``functools.lru_cache``, which locks)."""

    def __init__(self, manifest: Manifest, tokenizer: Tokenizer) -> None:
        self.manifest = manifest
        self.tokenizer = tokenizer
        self._eos = manifest.eos_token_ids[0]
        self._chat = manifest.chat_format if manifest.dialogue_format == "chat_template" else None
        self._encode = functools.lru_cache(maxsize=TEXT_CACHE)(self._encode_text)

    def _encode_text(self, text: str, allow_special: bool) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, allow_special=allow_special))

    def _special(self, piece: str) -> list[int]:
        return list(self._encode(piece, True)) if piece else []

    def _text(self, text: str) -> list[int]:
        return list(self._encode(text, False))

    def prefix_ids(self, system: str, leading: Sequence[Turn] = ()) -> list[int]:
        """Tokens that depend only on the persona: system message (chat) or leading turns (DialoGPT)."""
        if self._chat is None:
            return self.persona_ids(system, leading)
        return self.persona_ids(system) + self.notes_ids(()) + [t for turn in leading for t in self.turn_ids(turn)]

    def persona_ids(self, system: str, leading: Sequence[Turn] = ()) -> list[int]:
        """The turn-independent head of every prompt, whose KV cache is reused (``prefix_cache``).

        Chat: BOS, the system message's opening and the persona's text, the message left *open* so
        per-turn notes can follow inside it (``notes_ids`` closes it); DialoGPT: the leading turns.
        """
        if self._chat is None:
            return [tok for turn in leading for tok in self.turn_ids(turn)]
        if not system.strip():
            raise PromptError("A chat model needs a non-empty system prompt for the NPC's persona.")
        if leading:
            raise PromptError("A chat model takes the persona as its system prompt, not as leading turns.")
        c = self._chat
        return self._special(c.bos) + self._special(c.system_prefix) + self._text(system)

    def notes_ids(self, notes: Sequence[tuple[str, str]]) -> list[int]:
        """Per-turn notes (game context, lorebook, memory) after ``persona_ids``, as (question, note).

        Chat: each note on its own line inside the still open system message, which this closes;
        DialoGPT: each note as the NPC's answer to the question, as two turns.
        """
        if self._chat is None:
            return [t for question, note in notes for turn in (Turn("user", question), Turn("assistant", note))
                    for t in self.turn_ids(turn)]
        text = "".join(f"\n{note}" for _, note in notes)
        return (self._text(text) if text else []) + self._special(self._chat.system_suffix)

    def post_history_ids(self, text: str) -> list[int]:
        """Instructions after the dialogue, before the generation prompt: a system message (chat
        models); nothing for DialoGPT, which has no way to take an instruction."""
        if self._chat is None or not text.strip():
            return []
        c = self._chat
        return self._special(c.system_prefix) + self._text(text.strip()) + self._special(c.system_suffix)

    def turn_ids(self, turn: Turn) -> list[int]:
        """One finished turn as tokens, closed the way the model closes it."""
        if turn.role not in ("user", "assistant"):
            raise PromptError(f"Unknown dialogue role {turn.role!r}; use 'user' (player) or 'assistant' (NPC).")
        if self._chat is None:
            return self._text(turn.text) + [self._eos]
        c = self._chat
        pre, suf = (c.user_prefix, c.user_suffix) if turn.role == "user" else (c.assistant_prefix, c.assistant_suffix)
        return self._special(pre) + self._text(turn.text) + self._special(suf)

    def generation_prompt_ids(self) -> list[int]:
        """Tokens that open the NPC's reply (empty for DialoGPT: the reply follows the last EOS)."""
        return self._special(self._chat.assistant_prefix) if self._chat else []

    def prompt_ids(self, system: str, turns: Sequence[Turn], leading: Sequence[Turn] = ()) -> list[int]:
        """The whole prompt: prefix, every turn, generation prompt."""
        ids = self.prefix_ids(system, leading)
        for turn in turns:
            ids += self.turn_ids(turn)
        return ids + self.generation_prompt_ids()
