"""ChatSession: one NPC talking with one player, in-process; and the terminal chat built on it.

The persona prefix (system prompt, or DialoGPT's leading turns) is prefilled once; each turn
rewinds the generator to the end of that prefix and appends only the turn's notes (game context,
lorebook entries the dialogue mentions), the history, the new line and the persona's post-history
instructions, as onnxruntime-genai's chat example does with its system prompt. Older turns are
dropped first when the context would overflow; the persona is never cut.

Reranking (``Persona.rerank`` or the ``rerank`` argument, off by default): the reply is sampled
``candidates`` times from the same prompt (the generator is rewound to the end of the prompt
between them), scored by ``rerank.score_candidates`` and the best one is yielded whole, as one
chunk, once chosen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from collections.abc import Mapping
from typing import Any

from .dialogue import DialogueFormatter, Turn
from .errors import PromptError
from .generator import Generator, GeneratorParams
from .memory import fit_turns
from .model import Model
from .slot_model import open_model
from .grounding import Grounding
from .npcs import CONTEXT_QUESTION, LORE_QUESTION, post_history, render_context
from .paths import default_bundle_path
from .persona import DEFAULT_USER, Persona, find_persona
from .rerank import RerankConfig, best_index, score_candidates
from .sampling import CHAT_DEFAULTS, SearchOptions
from .steering import FactSteering
from .stream import ReplyStream

log = logging.getLogger(__name__)


class ChatSession:
    """A conversation with one NPC. Not thread-safe: one caller drives it."""

    def __init__(self, model: Model, persona: Persona, options: SearchOptions = CHAT_DEFAULTS, *,
                 user: str = DEFAULT_USER, rerank: RerankConfig | None = None) -> None:
        """``user`` is the player's name (``{{user}}`` in the persona); ``rerank`` overrides the persona's;
        the persona's ``sampling`` fields override ``options``."""
        options = persona.sampling.apply(options)
        self.model = model
        self.persona = persona
        self.options = options
        self.user = user
        self.rerank = rerank if rerank is not None else persona.rerank
        self.history: list[Turn] = []
        self.finish_reason: str | None = None
        self.candidates: list[tuple[str, float]] = []  # the last reranked turn's (reply, score)
        if self.rerank.enabled and not options.do_sample:
            log.warning("Reranking %d candidates with greedy decoding gives %d copies of one reply; "
                        "turn sampling on (temperature > 0).", self.rerank.candidates, self.rerank.candidates)
        self._formatter = DialogueFormatter(model.manifest, model.tokenizer)
        if model.manifest.dialogue_format == "chat_template":
            system, leading = persona.system_prompt(user), []
        else:
            system, leading = "", [Turn(role, text) for role, text in persona.leading_turns(user)]  # type: ignore[arg-type]
        self._prefix = self._formatter.persona_ids(system, leading)
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

    def say(self, text: str, context: Mapping[str, Any] | None = None) -> Iterator[str]:
        """Send the player's line (and the game's ``context``); yield the NPC's reply as it is generated
        (reranked: whole, once chosen).

        After the iterator is exhausted, the turn is in ``history`` and ``finish_reason`` is set.
        """
        text = text.strip()
        if not text:
            raise PromptError("The player's line is empty.")
        turns = [*self.history, Turn("user", text)]
        notes: list[tuple[str, str]] = []
        situation = render_context(context or {})
        if situation:
            notes.append((CONTEXT_QUESTION, situation))
        notes += [(LORE_QUESTION, lore) for lore in self.persona.lore_for([t.text for t in turns], self.user)]
        body = self._fit(turns, self._formatter.notes_ids(notes))
        self._generator.rewind_to(len(self._prefix))
        self._generator.append_tokens(body)
        grounding = None
        if self.rerank.enabled or self.options.fact_bias > 0:  # as the server: built only when used
            grounding = Grounding.build(self.persona, text, context=[note for _, note in notes], player=self.user,
                                        player_lines=[t.text for t in self.history if t.role == "user"])
        self._generator.set_steering(None if grounding is None else
                                     FactSteering.build(grounding, self.model.tokenizer, self.options.fact_bias))
        if self.rerank.enabled:
            assert grounding is not None
            reply, reason = self._reranked(len(self._prefix) + len(body), grounding)
            if reply:
                yield reply
        else:
            stream = ReplyStream(self._generator, self.model.tokenizer)
            yield from stream
            reply, reason = stream.text, stream.finish_reason
        self.finish_reason = reason
        self.history = [*turns, Turn("assistant", reply.strip())]

    def _reranked(self, prompt_length: int, grounding: Grounding) -> tuple[str, str | None]:
        """Sample ``rerank.candidates`` replies after the prompt; return the best and its finish reason."""
        replies: list[tuple[str, str | None]] = []
        for index in range(self.rerank.candidates):
            if index:
                self._generator.rewind_to(prompt_length)  # same prompt, the sampler's stream goes on
            stream = ReplyStream(self._generator, self.model.tokenizer)
            replies.append((stream.read(), stream.finish_reason))
        texts = [r for r, _ in replies]
        scores = score_candidates(self.model, self._formatter, texts, self.persona, self.rerank, grounding)
        self.candidates = list(zip(texts, scores))
        return replies[best_index(scores)]

    def _fit(self, turns: list[Turn], notes: list[int]) -> list[int]:
        """Notes + history + post-history + generation prompt as ids, oldest turns dropped until
        prompt and reply fit (``memory.fit_turns``, the one trimming rule the server uses too)."""
        budget = self.model.manifest.max_context - len(self._prefix) - len(notes) - self.options.max_new_tokens
        post = self._formatter.post_history_ids(post_history(self.persona, turns[-1].text, self.user))
        tail = self._formatter.turn_ids(turns[-1]) + post + self._formatter.generation_prompt_ids()
        return notes + fit_turns(self._formatter.turn_ids, turns[:-1], tail, budget, "The player's line")

def run_terminal_chat(
    *, bundle: Path | None, npc: str, personas_dir: Path | None, options: SearchOptions,
    provider: str, stdin: TextIO, stdout: TextIO,
) -> int:
    """Interactive chat on a terminal (or piped lines). Returns an exit code."""
    persona = find_persona(npc, personas_dir)
    model = open_model(bundle or default_bundle_path(), provider=provider)  # type: ignore[arg-type]
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
