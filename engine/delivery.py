"""Stream messages to clients that may stop reading, without breaking a stream's promises.

Sends never block (``send`` answers SENT, FULL or GONE at once), yet every ``say`` must still end
with exactly one terminal message whose ``seq`` follows the last message the client really got.
So ``Delivery`` remembers, per live stream, the next ``seq`` and the text that reached the client.
Once a send for a stream fails, the stream is *broken*: its later tokens are dropped (the caller
cancels it), and its terminal message is rewritten to what was delivered — ``seq`` = next
delivered, ``text`` = delivered text, ``finish_reason`` "cancelled" — then kept until the client's
queue has room again (``retry``), the client is gone, or ``give_up_s`` passes.

Memory is bounded: one record per live stream, at most one waiting terminal message per stream.
Not thread-safe: the engine loop owns it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .request import RequestKey

log = logging.getLogger(__name__)

Message = dict[str, Any]


class SendResult(enum.Enum):
    SENT = "sent"
    FULL = "full"   # the client's queue is full: it is not reading
    GONE = "gone"   # the client's connection is gone


@dataclass
class _Stream:
    next_seq: int = 0
    text: list[str] = field(default_factory=list)
    broken: bool = False


@dataclass
class _Waiting:
    message: Message
    since: float


class Delivery:
    """``send(client, message)`` moves one message; ``stream(key, message, now)`` delivers a say's message."""

    def __init__(self, send: Callable[[bytes, Message], SendResult], give_up_s: float) -> None:
        self._send = send
        self.give_up_s = give_up_s
        self._streams: dict[RequestKey, _Stream] = {}
        self._waiting: dict[RequestKey, _Waiting] = {}  # terminal messages waiting for room

    def stream(self, key: RequestKey, message: Message, now: float) -> SendResult:
        """Deliver a token/done/error message of ``key``'s stream; FULL/GONE mean: cancel that client."""
        state = self._streams.setdefault(key, _Stream())
        terminal = message["type"] in ("done", "error")
        if terminal:
            del self._streams[key]
            if state.broken:
                message = _rewrite(message, state)
        elif state.broken:
            return SendResult.SENT  # dropped on purpose: the stream is being cancelled
        result = self._send(key.client, message)
        if result is SendResult.SENT:
            if not terminal:
                state.next_seq += 1
                state.text.append(message["text"])
            return result
        if terminal:
            if result is SendResult.FULL:
                self._waiting[key] = _Waiting(message, now)
        else:
            state.broken = True
        return result

    def retry(self, now: float) -> None:
        """Try the waiting terminal messages again; forget those of gone or long-silent clients."""
        for key, waiting in list(self._waiting.items()):
            result = self._send(key.client, waiting.message)
            if result is SendResult.SENT or result is SendResult.GONE or now - waiting.since > self.give_up_s:
                if result is not SendResult.SENT:
                    log.info("Dropping the end of request %r: its client %s.", key.id,
                             "is gone" if result is SendResult.GONE else "has not read for too long")
                del self._waiting[key]

    def holds(self, key: RequestKey) -> bool:
        """``key``'s terminal message still waits to be sent."""
        return key in self._waiting

    @property
    def waiting(self) -> int:
        """Terminal messages waiting for a client's queue to have room."""
        return len(self._waiting)


def _rewrite(message: Message, state: _Stream) -> Message:
    """The terminal message of a broken stream: it follows the last message actually delivered."""
    out = {**message, "seq": state.next_seq}
    if out["type"] == "done":
        out.update(text="".join(state.text), finish_reason="cancelled")
    return out
