"""Token generation shaped like onnxruntime-genai: a params object, a generator, a short loop::

    params = GeneratorParams(model)
    params.set_search_options(max_new_tokens=64, do_sample=True, temperature=0.7, seed=1)
    gen = Generator(model, params)
    gen.append_tokens(prefix_ids)          # persona prefix: prefilled once
    prefix_len = len(gen.tokens)
    gen.append_tokens(turn_ids)
    while not gen.is_done():
        gen.generate_next_token()
        new_ids = gen.get_next_tokens()     # [token] (batch of one)
    gen.rewind_to(prefix_len)              # next turn reuses the prefix's KV cache

``append_tokens`` may also follow a finished reply (the player's next turn after the NPC's);
``max_new_tokens`` counts from the latest ``append_tokens``/``rewind_to``. A reply ends on an EOS id
of the manifest ("stop"), a stop string in its decoded text ("stop"), ``max_new_tokens`` or a full
context ("length"). Use ``stream.ReplyStream`` to get text. Not thread-safe: one generator per
conversation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np

from .bundle import Manifest
from .detokenizer import StreamingDetokenizer
from .errors import ConfigError, ContextOverflowError, GenerationError
from .first_words import FirstWords, with_first_words
from .kv_cache import KVCache
from .sampling import Sampler, SearchOptions
from .steering import FactSteering, SteeringCursor
from .stop import StopMatcher
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


class LanguageModel(Protocol):
    """What the generator needs from a model: ``model.Model``, or a scripted fake in tests."""

    manifest: Manifest
    tokenizer: Tokenizer

    def new_cache(self, batch_size: int = 1) -> KVCache: ...

    def forward(self, input_ids: np.ndarray, cache: KVCache) -> np.ndarray: ...


class GeneratorParams:
    """Search options for generators of ``model``; fill with ``set_search_options(**kw)``."""

    def __init__(self, model: LanguageModel, search_options: SearchOptions | None = None) -> None:
        self.model = model
        self.search_options = search_options or SearchOptions()

    def set_search_options(self, options: SearchOptions | None = None, /, **changes: object) -> None:
        """Use ``options`` (if given), then change fields by name: ``set_search_options(top_k=20)``.

        ``ConfigError`` for unknown names or bad values.
        """
        if options is not None and not isinstance(options, SearchOptions):
            raise ConfigError(f"set_search_options takes a SearchOptions or keywords, got {type(options).__name__}.")
        known = {f.name for f in dataclasses.fields(SearchOptions)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"Unknown search options {unknown}; known ones are {sorted(known)}.")
        self.search_options = dataclasses.replace(options or self.search_options, **changes)


class Generator:
    """One conversation's tokens, KV cache and sampler (batch of one)."""

    def __init__(self, model: LanguageModel, params: GeneratorParams) -> None:
        self.model = model
        self.options = params.search_options
        self._sampler = Sampler(self.options)
        self._eos = frozenset(model.manifest.eos_token_ids)
        self._max_context = model.manifest.max_context
        self._cache = model.new_cache(batch_size=1)
        self._tokens: list[int] = []
        # Logits (1, vocab) predicting position len(tokens); None until the cache has caught up.
        self._logits: np.ndarray | None = None
        self._steering: SteeringCursor | None = None
        self._start_reply(0)

    def set_steering(self, steering: FactSteering | None) -> None:
        """Nudge the next replies towards stating a fact (``steering.FactSteering``; None: stop)."""
        self._steering = None if steering is None else SteeringCursor(steering)

    def _start_reply(self, start: int) -> None:
        self._reply_start = start
        self._finish: FinishReason | None = None
        self._first = FirstWords(self.model.tokenizer, self._eos)  # no EOS before the reply says something
        stops = self.options.stop_strings
        self._detok = StreamingDetokenizer(self.model.tokenizer) if stops else None
        self._stop = StopMatcher(stops) if stops else None
        if self._steering is not None:  # a new reply: its own steering cache
            self._steering = SteeringCursor(self._steering.steering)

    @property
    def tokens(self) -> list[int]:
        """Every token so far: prompts, replies, EOS included."""
        return list(self._tokens)

    @property
    def reply_tokens(self) -> list[int]:
        """Tokens generated since the latest ``append_tokens`` or ``rewind_to``."""
        return self._tokens[self._reply_start:]

    @property
    def finish_reason(self) -> FinishReason | None:
        """Why the reply ended: "stop" (EOS or stop string), "length", or None while running."""
        return self._finish

    def is_done(self) -> bool:
        return self._finish is not None

    def append_tokens(self, ids: Sequence[int]) -> None:
        """Append prompt tokens and prefill them; a new reply starts after them."""
        ids = [int(i) for i in ids]
        vocab = self.model.manifest.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise GenerationError(f"Token ids must be in [0, {vocab}); got {[i for i in ids if not 0 <= i < vocab][:5]}.")
        total = len(self._tokens) + len(ids)
        if total >= self._max_context:
            raise ContextOverflowError(
                f"The conversation would be {total} tokens, leaving no room for a reply in the model's context "
                f"of {self._max_context} tokens; drop older turns or rewind."
            )
        self._tokens += ids
        if ids:
            self._logits = self._forward_pending()
        self._start_reply(len(self._tokens))

    def generate_next_token(self) -> None:
        """Pick one token and add it to ``tokens``; updates ``is_done`` and ``finish_reason``."""
        if not self._tokens:
            raise GenerationError("Call append_tokens with a prompt before generate_next_token.")
        if self._finish is not None:
            raise GenerationError(f"The reply has finished ({self._finish}); append tokens or rewind_to before generating more.")
        # 1. Logits for the next position: run the token(s) the cache has not seen yet.
        if self._logits is None:
            self._logits = self._forward_pending()  # (1, vocab)
        # 2. Process and sample with the whole conversation as history, after fact steering's bonus
        #    and, until the reply has visible text, a ban on EOS (first_words.py).
        bonus = {} if self._steering is None else self._steering.bonus(self.reply_tokens)
        token = self._sampler.next_token(self._logits, self._tokens, with_first_words(bonus, self._first))
        # 3. Record it; its KV is computed lazily by the next step (never for a reply's last token).
        self._tokens.append(token)
        self._first.see(token)
        self._logits = None
        # 4. Finished?
        self._finish = self._finish_reason_after(token)

    def get_next_tokens(self) -> list[int]:
        """The token the last ``generate_next_token`` produced, one per batch row ([] before any)."""
        return [self._tokens[-1]] if len(self._tokens) > self._reply_start else []

    def rewind_to(self, n: int) -> None:
        """Keep the first ``n`` tokens and their KV cache (e.g. the persona prefix); a new reply starts there."""
        if not 0 <= n <= len(self._tokens):
            raise GenerationError(f"Cannot rewind to {n} tokens: the generator holds {len(self._tokens)}.")
        self._tokens = self._tokens[:n]  # a new list: the sampler's history index re-reads a cut history
        self._cache.rewind(min(self._cache.length, n))
        self._logits = None
        self._start_reply(n)

    def _forward_pending(self) -> np.ndarray:
        """Feed the tokens the cache lacks; return logits (1, vocab) for the next position."""
        if self._cache.length == len(self._tokens):
            # Logits of the last cached token were not kept (after a rewind): recompute that one token.
            self._cache.rewind(len(self._tokens) - 1)
        pending = np.asarray([self._tokens[self._cache.length:]], dtype=np.int64)  # (1, seq)
        return self.model.forward(pending, self._cache)

    def _finish_reason_after(self, token: int) -> FinishReason | None:
        if token in self._eos:
            return "stop"
        if self._stop is not None and self._detok is not None:
            self._stop.push(self._detok.push(token))  # text only matters here for matching
            if self._stop.stopped:
                return "stop"
        if len(self._tokens) - self._reply_start >= self.options.max_new_tokens:
            return "length"
        if len(self._tokens) >= self._max_context:
            log.info("Reply cut at the model's context of %d tokens.", self._max_context)
            return "length"
        return None
