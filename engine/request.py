"""One ``say`` request inside the server: its state machine, its reply decoding, its events.

States and the only legal moves (``TRANSITIONS``; ``Request.advance`` enforces them)::

    QUEUED ──► PREFILLING ──► DECODING ──► FINISHED   (done: stop / length / cancelled)
       │            │             │
       │            ├─────────────┴──────► FAILED     (error: timeout / internal)
       └──► FINISHED (cancelled while queued), FAILED (deadline while queued)

FINISHED and FAILED are terminal and each is entered through exactly one method (``finish``,
``fail``) that returns the terminal event, so a request can never produce two terminal messages.

Reply decoding mirrors ``generator.Generator`` + ``stream.ReplyStream`` (same sampler seeding, same
finish rules, same text guarantees: EOS never shown, no split UTF-8, stop strings held back), but
the KV cache lives outside, in the scheduler's batch. ``tests/engine/test_scheduler.py`` checks the
two paths produce the same text. Not thread-safe: the engine loop owns every request.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .detokenizer import StreamingDetokenizer
from .errors import RequestStateError
from .first_words import FirstWords, with_first_words
from .pick import pick_many
from .protocol import ErrorCode
from .sampling import Sampler, SearchOptions
from .steering import FactSteering, SteeringCursor
from .stop import StopMatcher
from .tokenizer import Tokenizer

FinishReason = Literal["stop", "length", "cancelled"]


class RequestState(enum.Enum):
    QUEUED = "queued"            # accepted, waiting for a batch row
    PREFILLING = "prefilling"    # prompt running through the model, a chunk per engine step
    DECODING = "decoding"        # a row of the decode batch, one token per step
    FINISHED = "finished"        # terminal: a done message was produced
    FAILED = "failed"            # terminal: an error message was produced


TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    RequestState.QUEUED: frozenset({RequestState.PREFILLING, RequestState.FINISHED, RequestState.FAILED}),
    RequestState.PREFILLING: frozenset({RequestState.DECODING, RequestState.FINISHED, RequestState.FAILED}),
    RequestState.DECODING: frozenset({RequestState.FINISHED, RequestState.FAILED}),
    RequestState.FINISHED: frozenset(),
    RequestState.FAILED: frozenset(),
}
LIVE_STATES = frozenset({RequestState.QUEUED, RequestState.PREFILLING, RequestState.DECODING})


@dataclass(frozen=True)
class RequestKey:
    """Requests are named by the client's routing identity and the client's own id."""

    client: bytes
    id: str


@dataclass(frozen=True)
class TokenEvent:
    """A chunk of reply text (``seq`` numbers every message of the request, from 0)."""

    request: Request
    seq: int
    text: str


@dataclass(frozen=True)
class DoneEvent:
    """The reply ended; ``request`` holds text, finish reason, usage and timings."""

    request: Request
    seq: int


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed; it produces no more messages."""

    request: Request
    seq: int
    code: ErrorCode
    message: str


Event = TokenEvent | DoneEvent | ErrorEvent


@dataclass(eq=False)
class Request:
    """A ``say`` in flight. Times are ``time.monotonic()`` seconds; ``meta`` is the caller's (NPC, player, …)."""

    key: RequestKey
    prompt_ids: list[int]
    options: SearchOptions
    tokenizer: Tokenizer
    eos_ids: frozenset[int]
    max_context: int
    received_at: float = field(default_factory=time.monotonic)
    deadline: float = float("inf")
    meta: Any = None
    steering: FactSteering | None = None  # nudges the reply towards the fact asked about (steering.py)
    state: RequestState = RequestState.QUEUED
    cancel_requested: bool = False
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: FinishReason | None = None

    def __post_init__(self) -> None:
        self.tokens: list[int] = list(self.prompt_ids)  # prompt + reply; the last one is fed next step
        self._sampler = Sampler(self.options)
        self._detok = StreamingDetokenizer(self.tokenizer)
        self._stop = StopMatcher(self.options.stop_strings)
        self._chunks: list[str] = []
        self._seq = 0
        self._steer: SteeringCursor | None = None
        self._first = FirstWords(self.tokenizer, self.eos_ids)  # no EOS before the reply says something
        self._unbooked: int | None = None  # taken by ``take``, not yet turned into text by ``book``

    # --- state machine: every change of ``state`` goes through here ---------------------------------

    def advance(self, new: RequestState) -> None:
        """Move to ``new``; ``RequestStateError`` when the state machine forbids it."""
        if new not in TRANSITIONS[self.state]:
            raise RequestStateError(
                f"Request {self.key.id!r} cannot go from {self.state.value} to {new.value}; "
                f"from {self.state.value} it may only go to {sorted(s.value for s in TRANSITIONS[self.state]) or 'nowhere'}."
            )
        self.state = new

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def finish(self, reason: FinishReason, now: float) -> DoneEvent:
        """End with a done message (the only way into FINISHED)."""
        self.advance(RequestState.FINISHED)
        self.finish_reason, self.finished_at = reason, now
        return DoneEvent(self, self._next_seq())

    def fail(self, code: ErrorCode, message: str, now: float) -> ErrorEvent:
        """End with an error message (the only way into FAILED)."""
        self.advance(RequestState.FAILED)
        self.finished_at = now
        return ErrorEvent(self, self._next_seq(), code, message)

    def _next_seq(self) -> int:
        seq, self._seq = self._seq, self._seq + 1
        return seq

    # --- reply decoding ------------------------------------------------------------------------------

    def choose(self, logits: np.ndarray, now: float) -> tuple[list[Event], FinishReason | None]:
        """Sample the next token from ``logits`` (1, vocab); return the text events it makes and,
        when the reply is over, why (the caller then calls ``finish``)."""
        return self.accept(self.pick(logits), now)

    def pick(self, logits: np.ndarray) -> int:
        """The next token from the whole logits row (1, vocab): steering's bonus, then the sampler
        (history: prompt + reply). Draws from the request's generator; takes nothing."""
        return self._sampler.next_token(logits, self.tokens, self.bonus())

    @property
    def needs_logits(self) -> bool:
        """False when the next token is just the argmax of the raw logits (greedy, no repetition
        controls, no steering bonus and EOS not banned at this point): then a device that computes the
        argmax itself (``SlotBatch.forward_greedy``) can hand over the token alone and ``accept`` takes it."""
        o = self.options
        if not o.greedy or o.repetition_penalty != 1.0 or o.no_repeat_ngram_size or not self._first.spoken:
            return True
        return bool(self._steering_bonus())

    def bonus(self) -> dict[int, float]:
        """Logit bonus (token → logits) for the next token: fact steering's, and -inf on EOS until the
        reply says something. Changes only as tokens are taken."""
        return with_first_words(self._steering_bonus(), self._first)

    def _steering_bonus(self) -> dict[int, float]:
        """Fact steering's bonus for the next token (no copy of the reply once steering is over)."""
        cursor = self._cursor()
        return {} if cursor.over else cursor.bonus(self.tokens[len(self.prompt_ids):])

    def _cursor(self) -> SteeringCursor:
        """The steering's per-reply cache (made again if ``steering`` was replaced)."""
        if self._steer is None or self._steer.steering is not self.steering:
            self._steer = SteeringCursor(self.steering)
        return self._steer

    def accept(self, token: int, now: float) -> tuple[list[Event], FinishReason | None]:
        """Take ``token`` as the next one (``choose`` after sampling, or the device's greedy pick)."""
        self.take(token, now)
        return self.book()

    def take(self, token: int, now: float) -> bool:
        """Append ``token`` to the reply (the next decode step may feed it before ``book`` turns it
        into text); True when the reply ends with it whatever its text says (EOS or length: a stop
        string is only found by ``book``)."""
        self.tokens.append(token)
        self._first.see(token)
        self._unbooked = token
        if self.first_token_at is None:
            self.first_token_at = now
        return token in self.eos_ids or self._at_length()

    def book(self) -> tuple[list[Event], FinishReason | None]:
        """The text events of the token ``take`` appended, and why the reply ends with it (or None)."""
        token, self._unbooked = self._unbooked, None
        if token is None:
            raise RequestStateError(f"Request {self.key.id!r} has no taken token to book.")
        text = "" if token in self.eos_ids else self._stop.push(self._detok.push(token))
        reason = self._finish_reason_after(token)
        if reason is not None:
            # Whatever is held back is neither a split character's start nor a stop string.
            text += self._stop.push(self._detok.flush()) + self._stop.flush()
        return self._text_events(text), reason

    def _at_length(self) -> bool:
        return self.completion_tokens >= self.options.max_new_tokens or len(self.tokens) >= self.max_context

    def _finish_reason_after(self, token: int) -> FinishReason | None:
        if token in self.eos_ids or self._stop.stopped:
            return "stop"
        return "length" if self._at_length() else None

    def emit_text(self, text: str) -> list[Event]:
        """Text decided outside this request's own decoding (a reranked say's chosen candidate) as its
        token event, with the same seq and text bookkeeping as streamed text; [] for no text."""
        return self._text_events(text)

    def _text_events(self, text: str) -> list[Event]:
        if not text:
            return []
        self._chunks.append(text)
        return [TokenEvent(self, self._next_seq(), text)]

    @property
    def pending_token(self) -> int:
        """The token the next decode step feeds (the last one sampled)."""
        return self.tokens[-1]

    @property
    def cached_length(self) -> int:
        """Positions this request's KV cache holds between steps: every token but the pending one."""
        return len(self.tokens) - 1

    # --- results -------------------------------------------------------------------------------------

    @property
    def text(self) -> str:
        """The reply so far: the joined text of every token event."""
        return "".join(self._chunks)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens) - len(self.prompt_ids)

    def timings_ms(self) -> dict[str, float | None]:
        """queue_ms (received → prefill), ttft_ms (received → first token, None if none), total_ms."""
        end = self.finished_at if self.finished_at is not None else time.monotonic()

        def since_received(t: float | None) -> float | None:
            return None if t is None else (t - self.received_at) * 1000.0

        return {"queue_ms": since_received(self.admitted_at if self.admitted_at is not None else end) or 0.0,
                "ttft_ms": since_received(self.first_token_at), "total_ms": since_received(end) or 0.0}


def pick_from_many(requests: Sequence[Request], ids: np.ndarray, values: np.ndarray, *,
                   bonused: bool = False) -> list[int | None]:
    """Each request's next token from its row's top candidates (``topk.TopTokens``: ids and raw
    logits, row ``i`` of ``ids``/``values`` (rows, k) being ``requests[i]``'s), rows sharing
    processing options picked together (``pick.pick_many``): the token ``Request.pick`` would take
    from the whole row, or None where the candidates cannot tell (nothing is drawn then).
    ``bonused``: the candidates are the top k of the logits with each request's ``bonus`` already
    added (``topk.Bonus``)."""
    bonuses = [{} for _ in requests] if bonused else [r.bonus() for r in requests]
    return pick_many([r._sampler for r in requests], ids, values, [r.tokens for r in requests], bonuses)


def check_prompt(prompt_ids: Sequence[int], options: SearchOptions, max_context: int) -> str | None:
    """Why a prompt cannot run (None when it can): it must leave room for at least one token."""
    if not prompt_ids:
        return "The prompt is empty."
    if len(prompt_ids) >= max_context:
        return f"The prompt is {len(prompt_ids)} tokens; the model's context holds {max_context}."
    return None
