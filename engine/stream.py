"""One reply as a stream of text chunks: generator → detokenizer → stop strings → caller.

    stream = ReplyStream(generator)
    for chunk in stream:          # drives generate_next_token until the reply ends
        show(chunk)
    stream.text, stream.finish_reason, stream.completion_tokens

Guarantees: EOS tokens are never emitted as text; no chunk holds a half character (no U+FFFD from
split UTF-8); text that might begin a stop string is held until resolved, and the stop string and
anything after it are never emitted; ``"".join(chunks) == stream.text``. Not thread-safe.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from .detokenizer import StreamingDetokenizer
from .generator import FinishReason, Generator
from .stop import StopMatcher
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


class ReplyStream:
    """Iterate to drive ``generator`` through one reply and receive its text in chunks."""

    def __init__(self, generator: Generator, tokenizer: Tokenizer | None = None) -> None:
        self._gen = generator
        self._eos = frozenset(generator.model.manifest.eos_token_ids)
        self._detok = StreamingDetokenizer(tokenizer or generator.model.tokenizer)
        self._stop = StopMatcher(generator.options.stop_strings)
        self._chunks: list[str] = []
        self.prompt_tokens = len(generator.tokens) - len(generator.reply_tokens)

    def __iter__(self) -> Iterator[str]:
        while not self._gen.is_done():
            self._gen.generate_next_token()
            token = self._gen.get_next_tokens()[0]
            if token in self._eos:
                break
            if chunk := self._emit(self._stop.push(self._detok.push(token))):
                yield chunk
        # The reply is over: whatever is held back is neither a split character's start nor a stop string.
        if chunk := self._emit(self._stop.push(self._detok.flush()) + self._stop.flush()):
            yield chunk

    def _emit(self, chunk: str) -> str:
        if chunk:
            self._chunks.append(chunk)
        return chunk

    def read(self) -> str:
        """Drive the reply to its end and return the whole text."""
        for _ in self:
            pass
        return self.text

    @property
    def text(self) -> str:
        """The reply's text so far, stop string excluded."""
        return "".join(self._chunks)

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._gen.finish_reason

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the reply, if one did."""
        return self._stop.matched

    @property
    def completion_tokens(self) -> int:
        """Tokens generated for this reply, EOS and stop-string tokens included."""
        return len(self._gen.reply_tokens)


def stream_reply(generator: Generator, tokenizer: Tokenizer | None = None) -> Iterator[str]:
    """Text chunks of ``generator``'s next reply (see ``ReplyStream`` for the final text and counts)."""
    return iter(ReplyStream(generator, tokenizer))
