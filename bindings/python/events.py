"""What the client hands to callers: finished replies and the events of streaming ones. Immutable."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ClientError


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    """Server-side milliseconds from receipt: to prefill start, to first token (None if none), to done."""

    queue_ms: float
    ttft_ms: float | None
    total_ms: float


@dataclass(frozen=True)
class SayResult:
    """A finished reply. ``finish_reason``: "stop", "length" or "cancelled"."""

    id: str
    npc: str
    text: str
    finish_reason: str
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class TokenEvent:
    id: str
    npc: str
    seq: int
    text: str


@dataclass(frozen=True)
class DoneEvent:
    id: str
    npc: str
    result: SayResult


@dataclass(frozen=True)
class ErrorEvent:
    id: str
    npc: str
    error: ClientError


Event = TokenEvent | DoneEvent | ErrorEvent
