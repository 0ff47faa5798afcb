"""One open conversation with an NPC: the line being typed, the reply as it streams, and its state.

States of the reply (one enum, transitions only through the methods below)::

    IDLE ──send()──► THINKING ──token()──► STREAMING ──done()──► IDLE
                        │                      │
                        └──── fail(message) ───┴──► FAILED ──send()──► THINKING

Pure state: no pygame, no sockets; ``game.py`` feeds it key presses and client events, ``ui.py``
draws it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_INPUT_CHARS = 200  # a player's line; the protocol allows more, the dialogue box does not


class ReplyState(enum.Enum):
    IDLE = "idle"            # waiting for the player to type
    THINKING = "thinking"    # sent; no token yet
    STREAMING = "streaming"  # tokens arriving
    FAILED = "failed"        # the reply ended with an error (shown in the box)


class IllegalTransition(Exception):
    """A dialogue event arrived in a state where it cannot happen (a bug in the caller)."""


@dataclass(frozen=True)
class Exchange:
    """A finished turn, for the transcript."""

    npc: str
    line: str
    reply: str
    finish_reason: str


class Dialogue:
    """The dialogue box's state for one NPC. ``reply_id`` ties client events to this reply."""

    def __init__(self, npc_key: str, npc_name: str, greeting: str = "") -> None:
        self.npc_key, self.npc_name = npc_key, npc_name
        self.state = ReplyState.IDLE
        self.input = ""
        self.line = ""                # the player's last sent line
        self.reply = greeting         # the NPC's text shown in the box
        self.error = ""
        self.reply_id: str | None = None
        self.tokens = 0

    @property
    def busy(self) -> bool:
        """A reply is on its way; the player cannot send another line yet."""
        return self.state in (ReplyState.THINKING, ReplyState.STREAMING)

    @property
    def thinking(self) -> bool:
        return self.state is ReplyState.THINKING

    # --- typing ---------------------------------------------------------------------------------------

    def type(self, text: str) -> None:
        """Append typed characters (control characters are dropped)."""
        clean = "".join(ch for ch in text if ch.isprintable())
        self.input = (self.input + clean)[:MAX_INPUT_CHARS]

    def backspace(self) -> None:
        self.input = self.input[:-1]

    def take_line(self) -> str | None:
        """The typed line to send (and clear the input), or None when empty or a reply is on its way."""
        line = self.input.strip()
        if not line or self.busy:
            return None
        self.input = ""
        return line

    # --- the reply ------------------------------------------------------------------------------------

    def send(self, line: str, reply_id: str) -> None:
        self._expect((ReplyState.IDLE, ReplyState.FAILED), "send a line")
        self.state, self.line, self.reply, self.error, self.reply_id, self.tokens = (
            ReplyState.THINKING, line, "", "", reply_id, 0)

    def token(self, text: str) -> None:
        self._expect((ReplyState.THINKING, ReplyState.STREAMING), "receive a token")
        self.state = ReplyState.STREAMING
        self.reply += text
        self.tokens += 1

    def done(self, text: str, finish_reason: str) -> Exchange:
        """The reply ended; ``text`` is the server's full reply (equal to the streamed tokens)."""
        self._expect((ReplyState.THINKING, ReplyState.STREAMING), "finish a reply")
        self.state, self.reply, self.reply_id = ReplyState.IDLE, text, None
        return Exchange(self.npc_name, self.line, text, finish_reason)

    def fail(self, message: str) -> None:
        """The reply could not be sent or was cut off; keep what streamed, show why."""
        self.state, self.error, self.reply_id = ReplyState.FAILED, message, None

    def _expect(self, states: tuple[ReplyState, ...], what: str) -> None:
        if self.state not in states:
            raise IllegalTransition(f"Cannot {what} while the reply from {self.npc_name} is {self.state.value}; "
                                    f"expected {' or '.join(s.value for s in states)}.")
