"""Stop strings on streamed text, with hold-back.

Text arrives in chunks; a stop string may span chunks (``"\\nPla"`` + ``"yer:"``). ``StopMatcher``
releases only text that cannot be the start of a stop string, so neither the stop string nor
anything after it is ever emitted. Not thread-safe: one matcher per stream.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """``push`` text chunks, get back the part that is safe to emit; ``stopped`` once a stop string appears."""

    def __init__(self, stop_strings: Sequence[str]) -> None:
        self.stop_strings = tuple(s for s in stop_strings if s)
        self._held = ""  # text not emitted yet: could still begin a stop string
        self.stopped = False
        self.matched: str | None = None

    def push(self, chunk: str) -> str:
        """Add ``chunk``; return the text now known to precede any stop string ('' once stopped)."""
        if self.stopped:
            return ""
        text = self._held + chunk
        hits = [(i, s) for s in self.stop_strings if (i := text.find(s)) >= 0]
        if hits:
            index, self.matched = min(hits)
            self.stopped, self._held = True, ""
            return text[:index]
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """End of stream: the held text turned out not to start a stop string; release it."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        longest = max((len(s) for s in self.stop_strings), default=0)
        for start in range(max(0, len(text) - longest + 1), len(text)):
            tail = text[start:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return len(text) - start
        return 0
