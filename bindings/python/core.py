"""The sans-I/O heart of both clients: request frames, reply matching, streams, liveness, retries.

``Client`` (blocking, game-loop ``poll``) and ``AsyncClient`` (asyncio) own a DEALER socket each and
differ only in how they wait on it; every protocol decision is made here, once:

* ``call``/``say``/``cancel`` build request frames (protocol v1, ``npctalk.engine.protocol``) with
  unique ids; ``feed`` matches each reply frame to its call or stream by id.
* A stream checks ``seq`` (0, 1, 2, … with no gap), assembles the text, and checks that ``done.text``
  equals the streamed chunks; a broken stream fails with ``ProtocolViolation`` and is cancelled.
* Liveness, the Lazy Pirate way (ZeroMQ Guide, ``lpclient.py``): while anything is pending, the
  client sends a ``ping`` every ``heartbeat`` seconds (which also tells the server it is alive); when
  the server has said nothing for ``timeout`` seconds, ``tick`` asks the shell to close the socket
  with LINGER 0 and open a new one; then ``reconnected`` resends the pending calls (at most
  ``retries`` times each) and fails the streams with ``ServerUnavailable`` (a half-shown reply
  cannot be resumed).
* Events (token / done / error) are delivered once: to ``take_events`` (the game's ``poll``) or to
  the reply's own iterator, whichever asks first.

Times are ``clock()`` seconds. Not thread-safe: one thread or one event loop drives a core.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from npctalk.engine import protocol
from npctalk.engine.protocol import MAX_ARRAY_LEN, MessageType, Op, ProtocolError

from .errors import ClientClosed, ClientError, ProtocolViolation, ServerUnavailable, error_from_reply
from .events import DoneEvent, ErrorEvent, Event, SayResult, Timings, TokenEvent, Usage

log = logging.getLogger(__name__)

TIMEOUT_S = 3.0         # server silence (while something is pending) after which the connection is lost
RETRIES = 2             # resends of a request after a lost connection, before ServerUnavailable
HEARTBEAT_S = 1.0       # ping interval while something is pending
MAX_UNCLAIMED = 1024    # finished streams whose events nobody took yet; older ones are forgotten


class StreamState(enum.Enum):
    OPEN = "open"      # tokens may still arrive
    DONE = "done"      # terminal: result set
    FAILED = "failed"  # terminal: error set


@dataclass(eq=False)
class Stream:
    """One ``say`` as the client sees it."""

    id: str
    npc: str
    state: StreamState = StreamState.OPEN
    next_seq: int = 0
    chunks: list[str] = field(default_factory=list)
    result: SayResult | None = None
    error: ClientError | None = None
    unread: deque[tuple[int, Event]] = field(default_factory=deque)  # (arrival order, event)

    @property
    def finished(self) -> bool:
        return self.state is not StreamState.OPEN

    @property
    def text(self) -> str:
        return "".join(self.chunks)


@dataclass(eq=False)
class Call:
    """One request with a single reply (every op but ``say``)."""

    id: str
    op: Op
    frame: bytes
    attempts: int = 1
    reply: dict[str, Any] | None = None
    error: ClientError | None = None

    @property
    def finished(self) -> bool:
        return self.reply is not None or self.error is not None

    def result(self) -> dict[str, Any]:
        """The reply's fields (without type and id); raises the call's error."""
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        return {k: v for k, v in self.reply.items() if k not in ("type", "id")}


@dataclass(frozen=True)
class Tick:
    """What the shell must do now: send ``frames``; if ``reconnect``, first replace the socket and
    send ``ClientCore.reconnected()``'s frames."""

    frames: list[bytes]
    reconnect: bool = False


class ClientCore:
    """Protocol state of one client connection. See the module docstring."""

    def __init__(self, *, timeout: float = TIMEOUT_S, retries: int = RETRIES, heartbeat: float = HEARTBEAT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if timeout <= 0 or heartbeat <= 0 or retries < 0:
            raise ValueError(f"timeout and heartbeat must be > 0 and retries >= 0, got {timeout}, {heartbeat}, {retries}.")
        self.timeout, self.retries, self.heartbeat, self.clock = timeout, retries, min(heartbeat, timeout / 2), clock
        self._ids = (f"{os.urandom(3).hex()}-{n}" for n in itertools.count())
        self._calls: dict[str, Call] = {}
        self._streams: OrderedDict[str, Stream] = OrderedDict()  # open streams, then unclaimed finished ones
        self._internal: set[str] = set()  # ids of pings and cancels: their answers are only signs of life
        self._outbox: list[bytes] = []
        self._order = itertools.count()
        self._last_heard = self._last_sent = clock()
        self.closed = False

    # --- requests -------------------------------------------------------------------------------------

    def call(self, op: Op, **fields: Any) -> Call:
        """Register a request with one reply; the shell sends ``call.frame``."""
        self.check_open()
        self._wake()
        request_id = next(self._ids)
        call = Call(request_id, op, _frame(request_id, op, fields))
        self._calls[request_id] = call
        return call

    def say(self, npc: str, text: str, **fields: Any) -> tuple[ReplyView, bytes]:
        """Register a stream; returns its view and the frame to send. None-valued fields are left out."""
        self.check_open()
        self._wake()
        request_id = next(self._ids)
        stream = Stream(request_id, npc)
        self._streams[request_id] = stream
        if isinstance(fields.get("context"), Mapping):
            fields["context"] = dict(fields["context"])
        return ReplyView(self, stream), _frame(request_id, Op.SAY, {"npc": npc, "text": text, **fields})

    def cancel(self, stream: Stream) -> bytes | None:
        """The frame asking the server to end ``stream`` ("cancelled"); None when it already ended."""
        if stream.finished or self.closed:
            return None
        return self._internal_frame(Op.CANCEL, target=stream.id)

    def sent(self) -> None:
        """The shell sent a frame (heartbeats are only needed when nothing else goes out)."""
        self._last_sent = self.clock()

    # --- replies --------------------------------------------------------------------------------------

    def feed(self, frame: bytes) -> None:
        """One frame from the server."""
        self._last_heard = self.clock()
        try:
            message = protocol.parse_reply(frame)
        except ProtocolError as exc:
            log.warning("Ignoring an unreadable frame from the server: %s", exc.message)
            return
        request_id, kind = message.get("id"), message["type"]
        if request_id in self._internal:
            self._internal.discard(request_id)
            if kind == MessageType.OK and isinstance(message.get("unknown"), list):
                self._forget_lost(message["unknown"])
        elif request_id in self._calls:
            call = self._calls.pop(request_id)
            if kind == MessageType.OK:
                call.reply = message
            elif kind == MessageType.ERROR:
                call.error = error_from_reply(message)
            else:
                call.error = ProtocolViolation(f"The server answered {call.op.value} with a {kind} message.")
        elif isinstance(request_id, str) and request_id in self._streams and not self._streams[request_id].finished:
            self._on_stream_message(self._streams[request_id], message)
        elif request_id is None and kind == MessageType.ERROR:
            log.warning("The server rejected a request it could not read: %s", message.get("message"))
        else:
            log.debug("Ignoring a %s message for request %r, which is no longer pending.", kind, request_id)

    def _on_stream_message(self, stream: Stream, message: dict[str, Any]) -> None:
        seq, kind = message.get("seq", stream.next_seq), message["type"]
        if seq != stream.next_seq:
            self._fail_stream(stream, ProtocolViolation(f"Reply {stream.id!r} skipped from seq {stream.next_seq} to {seq}."))
            return
        stream.next_seq += 1
        if kind == MessageType.TOKEN:
            stream.chunks.append(message["text"])
            self._deliver(stream, TokenEvent(stream.id, stream.npc, seq, message["text"]))
        elif kind == MessageType.DONE:
            if message["text"] != stream.text:
                self._fail_stream(stream, ProtocolViolation(f"Reply {stream.id!r}: done.text differs from the streamed tokens."))
                return
            usage, timings = message["usage"], message["timings"]
            stream.result = SayResult(
                stream.id, stream.npc, message["text"], message["finish_reason"],
                Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))),
                Timings(float(timings.get("queue_ms", 0.0)), timings.get("ttft_ms"), float(timings.get("total_ms", 0.0))),
            )
            stream.state = StreamState.DONE
            self._deliver(stream, DoneEvent(stream.id, stream.npc, stream.result))
        elif kind == MessageType.ERROR:
            self._fail_stream(stream, error_from_reply(message), tell_server=False)
        else:
            self._fail_stream(stream, ProtocolViolation(f"Reply {stream.id!r} got a {kind} message."))

    def _forget_lost(self, ids: list[Any]) -> None:
        """The server said it no longer holds these streams: those not yet ended were lost with a restart
        or a re-established connection (their ends would have arrived before the ping's answer)."""
        for request_id in ids:
            stream = self._streams.get(request_id) if isinstance(request_id, str) else None
            if stream is not None and not stream.finished:
                self._fail_stream(stream, ServerUnavailable(
                    f"The server no longer has reply {stream.id!r} (it restarted or the connection was re-established) "
                    f"after {len(stream.chunks)} chunks."), tell_server=False)

    def _fail_stream(self, stream: Stream, error: ClientError, *, tell_server: bool = True) -> None:
        if tell_server and (frame := self.cancel(stream)):
            self._outbox.append(frame)  # stop the server streaming into a reply we gave up on
        stream.state, stream.error = StreamState.FAILED, error
        self._deliver(stream, ErrorEvent(stream.id, stream.npc, error))

    def _deliver(self, stream: Stream, event: Event) -> None:
        stream.unread.append((next(self._order), event))

    # --- time -----------------------------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Something awaits an answer from the server."""
        return bool(self._calls) or any(not s.finished for s in self._streams.values())

    def tick(self) -> Tick:
        """Heartbeat and liveness: call after receiving and whenever ``next_wakeup`` has passed."""
        frames, self._outbox = self._outbox, []
        if self.closed or not self.pending:
            return Tick(frames)
        now = self.clock()
        if now - self._last_heard > self.timeout:
            return Tick(frames, reconnect=True)
        if now - self._last_sent >= self.heartbeat:
            # The streams still waited on ride along: the answer names those the server no longer holds.
            waiting = [s.id for s in self._streams.values() if not s.finished][:MAX_ARRAY_LEN]
            frames.append(self._internal_frame(Op.PING, **({"streams": waiting} if waiting else {})))
        return Tick(frames)

    def next_wakeup(self) -> float | None:
        """Seconds until ``tick`` may have work (0 when now); None when nothing is pending."""
        if self._outbox:
            return 0.0
        if self.closed or not self.pending:
            return None
        now = self.clock()
        return max(0.0, min(self._last_sent + self.heartbeat, self._last_heard + self.timeout) - now)

    def reconnected(self) -> list[bytes]:
        """After the shell opened a fresh socket: fail the streams, resend the calls that may retry."""
        silent = self.clock() - self._last_heard
        lost = f"No message from the server for {silent:.1f} s (timeout {self.timeout:g} s)"
        for stream in [s for s in self._streams.values() if not s.finished]:
            self._fail_stream(stream, ServerUnavailable(f"{lost}; reply {stream.id!r} was cut after "
                                                        f"{len(stream.chunks)} chunks."), tell_server=False)
        resend = []
        for call in list(self._calls.values()):
            if call.attempts > self.retries:
                call.error = ServerUnavailable(f"{lost}; gave up on {call.op.value} after {call.attempts} attempts.")
                del self._calls[call.id]
            else:
                call.attempts += 1
                resend.append(call.frame)
        self._internal.clear()
        self._outbox.clear()
        self._last_heard = self._last_sent = self.clock()
        log.info("Reconnected to the server; resending %d requests.", len(resend))
        return resend

    # --- events ---------------------------------------------------------------------------------------

    def take_events(self) -> list[Event]:
        """Every event not yet taken, in arrival order (the game's ``poll``)."""
        pairs = [pair for stream in self._streams.values() for pair in stream.unread]
        for stream in self._streams.values():
            stream.unread.clear()
        self._forget_finished()
        return [event for _, event in sorted(pairs, key=lambda pair: pair[0])]

    def take_stream_events(self, stream: Stream) -> list[Event]:
        """``stream``'s events not yet taken, in order (a reply's own iterator)."""
        events = [event for _, event in stream.unread]
        stream.unread.clear()
        self._forget_finished()
        return events

    def _forget_finished(self) -> None:
        finished = [sid for sid, s in self._streams.items() if s.finished]
        unclaimed = [sid for sid in finished if self._streams[sid].unread]
        # Claimed streams are forgotten; of the unclaimed, only the newest MAX_UNCLAIMED are kept.
        for sid in [sid for sid in finished if not self._streams[sid].unread] + unclaimed[:-MAX_UNCLAIMED]:
            del self._streams[sid]

    def close(self) -> None:
        """Fail everything pending with ``ClientClosed``; later requests raise it."""
        if self.closed:
            return
        for stream in [s for s in self._streams.values() if not s.finished]:
            self._fail_stream(stream, ClientClosed("The client was closed while the reply streamed."), tell_server=False)
        for call in self._calls.values():
            call.error = ClientClosed(f"The client was closed before {call.op.value} was answered.")
        self._calls.clear()
        self.closed = True

    # --- helpers --------------------------------------------------------------------------------------

    def check_open(self) -> None:
        """``ClientClosed`` after ``close``."""
        if self.closed:
            raise ClientClosed("This client is closed; create a new one.")

    def _wake(self) -> None:
        if not self.pending:
            self._last_heard = self.clock()  # the silence clock starts with the first pending request

    def _internal_frame(self, op: Op, **fields: Any) -> bytes:
        request_id = next(self._ids)
        self._internal.add(request_id)
        return _frame(request_id, op, fields)


class ReplyView:
    """What ``Reply`` and ``AsyncReply`` share: the stream's state, and taking its events."""

    def __init__(self, core: ClientCore, stream: Stream) -> None:
        self._core, self._stream = core, stream

    @property
    def id(self) -> str:
        return self._stream.id

    @property
    def npc(self) -> str:
        return self._stream.npc

    @property
    def done(self) -> bool:
        """True once the reply has ended (finished, cancelled or failed)."""
        return self._stream.finished

    @property
    def text(self) -> str:
        """The text received so far."""
        return self._stream.text

    @property
    def result(self) -> SayResult | None:
        """The finished reply (None while streaming or after an error)."""
        return self._stream.result

    @property
    def error(self) -> ClientError | None:
        return self._stream.error

    def _take(self) -> tuple[list[str], bool]:
        """Text chunks not taken yet (not by ``poll`` either), and whether the reply is over."""
        texts = [e.text for e in self._core.take_stream_events(self._stream) if isinstance(e, TokenEvent)]
        return texts, self._stream.finished

    def _has_news(self) -> bool:
        return bool(self._stream.unread) or self._stream.finished

    def _outcome(self) -> SayResult:
        """The result of a reply that is over; raises its error."""
        if self._stream.error is not None:
            raise self._stream.error
        assert self._stream.result is not None
        return self._stream.result

    def _cancel_frame(self) -> bytes | None:
        return self._core.cancel(self._stream)


def _frame(request_id: str, op: Op, fields: Mapping[str, Any]) -> bytes:
    return protocol.encode({"v": protocol.PROTOCOL_VERSION, "id": request_id, "op": op.value,
                            **{k: v for k, v in fields.items() if v is not None}})
