"""ChatSession: one NPC talking with one player, in-process; and the terminal chat built on it.

The persona prefix (system prompt, or DialoGPT's leading turns) is prefilled once; each turn
rewinds the generator to the end of that prefix and appends only the history and the new line,
as onnxruntime-genai's chat example does with its system prompt. Older turns are dropped first
when the context would overflow; the persona is never cut.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from .dialogue import DialogueFormatter, Turn
from .errors import PromptError
from .generator import Generator, GeneratorParams
from .model import Model
from .paths import default_bundle_path
from .persona import Persona, find_persona
from .sampling import CHAT_DEFAULTS, SearchOptions
from .stream import ReplyStream

log = logging.getLogger(__name__)


class ChatSession:
    """A conversation with one NPC. Not thread-safe: one caller drives it."""

    def __init__(self, model: Model, persona: Persona, options: SearchOptions = CHAT_DEFAULTS) -> None:
        self.model = model
        self.persona = persona
        self.options = options
        self.history: list[Turn] = []
        self.finish_reason: str | None = None
        self._formatter = DialogueFormatter(model.manifest, model.tokenizer)
        if model.manifest.dialogue_format == "chat_template":
            system, leading = persona.system_prompt(), []
        else:
            system, leading = "", [Turn(role, text) for role, text in persona.leading_turns()]  # type: ignore[arg-type]
        self._prefix = self._formatter.prefix_ids(system, leading)
        if len(self._prefix) + options.max_new_tokens >= model.manifest.max_context:
            raise PromptError(
                f"{persona.name}'s persona takes {len(self._prefix)} tokens; with {options.max_new_tokens} "
                f"new tokens it leaves no room in the model's {model.manifest.max_context}-token context."
            )
        params = GeneratorParams(model)
        params.set_search_options(options)
        self._generator = Generator(model, params)
        self._generator.append_tokens(self._prefix)  # prefilled once, rewound to every turn

    @property
    def prefix_length(self) -> int:
        """Tokens in the persona prefix whose KV cache is reused every turn."""
        return len(self._prefix)

    def say(self, text: str) -> Iterator[str]:
        """Send the player's line; yield the NPC's reply as it is generated.

        After the iterator is exhausted, the turn is in ``history`` and ``finish_reason`` is set.
        """
        text = text.strip()
        if not text:
            raise PromptError("The player's line is empty.")
        turns = [*self.history, Turn("user", text)]
        body = self._fit(turns)
        self._generator.rewind_to(len(self._prefix))
        self._generator.append_tokens(body)
        stream = ReplyStream(self._generator, self.model.tokenizer)
        yield from stream
        self.finish_reason = stream.finish_reason
        self.history = [*turns, Turn("assistant", stream.text.strip())]

    def _fit(self, turns: list[Turn]) -> list[int]:
        """History + generation prompt as ids, oldest turns dropped until prompt and reply fit."""
        budget = self.model.manifest.max_context - len(self._prefix) - self.options.max_new_tokens
        start = 0
        while True:
            ids = [t for turn in turns[start:] for t in self._formatter.turn_ids(turn)]
            ids += self._formatter.generation_prompt_ids()
            if len(ids) <= budget:
                if start:
                    log.debug("Dropped the %d oldest turns to fit the context.", start)
                return ids
            if start >= len(turns) - 1:
                raise PromptError(
                    f"The player's line is {len(ids)} tokens; at most {budget} fit beside the persona "
                    f"and a {self.options.max_new_tokens}-token reply."
                )
            start += 1
            while start < len(turns) - 1 and turns[start].role != "user":
                start += 1  # keep the history opening with a player line


def run_terminal_chat(
    *, bundle: Path | None, npc: str, personas_dir: Path | None, options: SearchOptions,
    provider: str, stdin: TextIO, stdout: TextIO,
) -> int:
    """Interactive chat on a terminal (or piped lines). Returns an exit code."""
    persona = find_persona(npc, personas_dir)
    model = Model(bundle or default_bundle_path(), provider=provider)
    session = ChatSession(model, persona, options)
    interactive = stdin.isatty()
    log.info("Model %s on %s; persona prefix %d tokens.", model.manifest.name, model.provider, session.prefix_length)
    if interactive:
        stdout.write(f"[{model.manifest.name} on {model.provider}] Talking to {persona.name}. "
                     "Type /quit or Ctrl-D to leave.\n")
    if persona.greeting:
        stdout.write(f"{persona.name}: {persona.greeting}\n")
    stdout.flush()
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return 0
        if not line.strip():
            continue
        stdout.write(f"{persona.name}: ")
        for chunk in session.say(line):
            stdout.write(chunk)
            stdout.flush()
        stdout.write("\n")
        stdout.flush()
