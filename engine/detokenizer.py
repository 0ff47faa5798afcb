"""Token ids → text, one token at a time, for streaming replies.

Decoding each token on its own is wrong twice over:

* byte-level BPE splits a multi-byte character (``é``, ``東``, ``🐉``) across tokens, and a lone
  piece decodes to U+FFFD;
* SentencePiece-style decoders strip the leading space of the first token they see, so
  ``decode([a]) + decode([b]) != decode([a, b])``.

So we decode a short window of recent tokens and emit only what it adds beyond the window's
already-emitted prefix (the "prefix offset" method of vLLM and TGI). While the window's text ends in
U+FFFD the character is still incomplete and nothing is emitted.

Byte sequences that are not UTF-8 at all (a random or badly quantized model can produce them) would
decode to U+FFFD; a player should never see that, so those are dropped. The guarantee, tested:
``"".join(chunks) + flush() == tokenizer.decode(all_ids).replace("\ufffd", "")``, which for
well-formed text is ``tokenizer.decode(all_ids)`` exactly, and no chunk ever holds U+FFFD.

Not thread-safe: one detokenizer per stream.
"""

from __future__ import annotations

import logging

from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    """Feed ids with ``push``; get back only new, complete text. Call ``flush`` at the end."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        # ids[prefix:read] is context whose text was already emitted; ids[read:] is not emitted yet.
        self._prefix = 0
        self._read = 0
        self._chunks: list[str] = []

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is still partial)."""
        self._ids.append(int(token_id))
        emitted = self._decode(self._prefix, self._read)
        window = self._decode(self._prefix)
        if len(window) <= len(emitted) or window.endswith(REPLACEMENT):
            return ""
        # The window now becomes context: keep it short so each push decodes a handful of tokens.
        self._prefix, self._read = self._read, len(self._ids)
        return self._emit(window[len(emitted):])

    def flush(self) -> str:
        """Emit whatever is held back; a trailing incomplete character is invalid and dropped."""
        if self._read == len(self._ids):
            return ""
        new = self._decode(self._prefix)[len(self._decode(self._prefix, self._read)):]
        self._prefix, self._read = self._read, len(self._ids)
        return self._emit(new)

    def _emit(self, new: str) -> str:
        new = new.replace(REPLACEMENT, "")  # bytes that were never UTF-8: nothing a player should see
        if new:
            self._chunks.append(new)
        return new

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._chunks)

    @property
    def token_ids(self) -> list[int]:
        """Every id pushed so far."""
        return list(self._ids)
