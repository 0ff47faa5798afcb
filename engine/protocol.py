"""Wire protocol v1 between a game and ``npctalk serve``: names, limits, validation, encoding.

This module and ``bindings/PROTOCOL.md`` are the protocol; the server and the Python client both
use this module, and other bindings implement the document. Summary:

* The server binds a ZeroMQ ROUTER socket, clients connect DEALER sockets. Every message is one
  frame holding one msgpack map (strings are UTF-8 ``str``, never ``bin``).
* Request: ``{v: 1, id: <str, 1..64 chars>, op: <name>, ...op fields}``. Unknown fields are errors.
* Replies: ``{type: "ok", id, ...}`` for every op but ``say``; ``say`` streams
  ``{type: "token", id, seq, text}`` then exactly one ``{type: "done", ...}`` or ``{type: "error",
  ...}``; ``seq`` counts 0, 1, 2, … per request, terminal message included.
* Errors: ``{type: "error", id, code, message}`` with ``code`` one of ``ErrorCode``; ``id`` is nil
  when the request's own id could not be read; errors ending a ``say`` stream also carry ``seq``.

``parse_request`` turns a frame into a typed ``Request`` or raises ``ProtocolError`` (a code and a
full-sentence message, ready to send back); ``parse_reply`` does the same for the client side.
Both decode with hard limits (frame size, string/array/map lengths, nesting depth), so a hostile
frame costs at most ``MAX_REQUEST_BYTES`` of parsing. Stateless and thread-safe.

Two files, one protocol: ``wire.py`` holds the names, limits, framing and reply messages, this module
the typed requests and their validation, and re-exports ``wire``'s names, so callers import only
``protocol``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import wire
from .wire import (  # re-exported: callers import the whole protocol from here
    PROTOCOL_VERSION, SUPPORTED_VERSIONS, DEFAULT_ENDPOINT, MAX_REQUEST_BYTES, MAX_SOCKET_MESSAGE_BYTES,
    MAX_REPLY_BYTES, MAX_ID_CHARS, MAX_TEXT_CHARS, MAX_CONTEXT_ENTRIES, MAX_CONTEXT_CHARS, MAX_DEPTH,
    MAX_ARRAY_LEN, MAX_MAP_LEN, MAX_SEED, MAX_TEMPERATURE, MAX_DEADLINE_MS, MAX_FACT_CHARS, MAX_SAVE_BYTES,
    MAX_FACT_ID, SAVE_MODES, Op, MessageType, ErrorCode, FINISH_REASONS, ProtocolError, encode, decode,
    bad_request, describe, ok, token, done, error, parse_reply,
)

__all__ = [
    "CONTEXT_SCALARS", "Empty", "Ping", "NpcRef", "NpcUpsert", "Say", "Cancel", "MemoryRef", "MemoryRemember",
    "MemoryForget", "MemoryClear", "SaveExport", "SaveImport", "Params", "Request", "parse_request",
]
__all__ += wire.__all__

CONTEXT_SCALARS = (str, int, float, bool)


# --- typed requests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Empty:
    """Fields of ``hello``, ``npc.list`` and ``stats``: none."""


@dataclass(frozen=True)
class Ping:
    """``ping``: optionally the ids of this client's say streams it still waits on (answered with those the
    server no longer holds, so a client learns at once that a restart or a reconnect lost them)."""

    streams: tuple[str, ...] = ()


@dataclass(frozen=True)
class NpcRef:
    """``npc.get``: the NPC's id."""

    npc: str


@dataclass(frozen=True)
class NpcUpsert:
    """``npc.upsert``: the NPC's id and its persona fields (``engine.persona.Persona``)."""

    npc: str
    persona: dict[str, Any]


@dataclass(frozen=True)
class Say:
    """``say``: one player line to one NPC. None means the server's default."""

    npc: str
    text: str
    player: str = "player"
    context: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    deadline_ms: int | None = None  # the game's own deadline from receipt to done; the server's caps it


@dataclass(frozen=True)
class Cancel:
    """``cancel``: the id of one of this client's ``say`` requests."""

    target: str


@dataclass(frozen=True)
class MemoryRef:
    """``memory.get``: one (NPC, player) pair."""

    npc: str
    player: str = "player"


@dataclass(frozen=True)
class MemoryRemember:
    """``memory.remember``: a fact the game states about the player, for this NPC to remember."""

    npc: str
    fact: str
    player: str = "player"


@dataclass(frozen=True)
class MemoryForget:
    """``memory.forget``: one fact by id (``fact_id``), or every fact of the pair (``all``)."""

    npc: str
    player: str = "player"
    fact_id: int | None = None


@dataclass(frozen=True)
class MemoryClear:
    """``memory.clear``: everything the NPC remembers about ``player``, or about every player (None)."""

    npc: str
    player: str | None = None


@dataclass(frozen=True)
class SaveExport:
    """``save.export``: the memories of one NPC and/or one player (None: all) as one blob."""

    npc: str | None = None
    player: str | None = None


@dataclass(frozen=True)
class SaveImport:
    """``save.import``: a blob from ``save.export``; ``mode`` is "replace" or "merge"."""

    save: bytes
    mode: str = "replace"


Params = (Empty | Ping | NpcRef | NpcUpsert | Say | Cancel | MemoryRef | MemoryRemember | MemoryForget | MemoryClear
          | SaveExport | SaveImport)


@dataclass(frozen=True)
class Request:
    """A validated request: envelope plus the op's typed fields."""

    id: str
    op: Op
    params: Params


# --- parsing ----------------------------------------------------------------------------------------


def parse_request(frame: bytes) -> Request:
    """Validate a request frame; ``ProtocolError`` names the first problem.

    Frames are limited to ``MAX_REQUEST_BYTES``, except ``save.import`` (up to ``MAX_SAVE_BYTES``):
    a frame that holds the bytes of ``op: "save.import"`` is decoded with the larger limit, and its op
    is checked afterwards.
    """
    large = len(frame) > MAX_REQUEST_BYTES and _SAVE_IMPORT_OP in frame
    message = decode(frame, max_bytes=MAX_SAVE_BYTES if large else MAX_REQUEST_BYTES)
    raw_id = message.get("id")
    request_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= MAX_ID_CHARS else None
    try:
        if request_id is None:
            raise bad_request(f"'id' must be a string of 1 to {MAX_ID_CHARS} characters, got {describe(raw_id)}.")
        version = message.get("v")
        if type(version) is not int:
            raise bad_request(f"'v' must be the integer protocol version, got {describe(version)}.")
        if version not in SUPPORTED_VERSIONS:
            raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                                f"Protocol version {version} is not supported; this server speaks {list(SUPPORTED_VERSIONS)}.")
        op_name = message.get("op")
        if not isinstance(op_name, str):
            raise bad_request(f"'op' must be a string, got {describe(op_name)}.")
        if op_name not in Op.__members__.values():
            raise ProtocolError(ErrorCode.UNKNOWN_OP, f"Unknown op {op_name[:40]!r}; known ops are {[o.value for o in Op]}.")
        op = Op(op_name)
        if len(frame) > MAX_REQUEST_BYTES and op is not Op.SAVE_IMPORT:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"The message is {len(frame)} bytes; the limit is {MAX_REQUEST_BYTES}.")
        fields = {k: v for k, v in message.items() if k not in ("v", "id", "op")}
        return Request(request_id, op, _PARSERS[op](fields))
    except ProtocolError as exc:
        exc.request_id = request_id
        raise


def _parse_empty(fields: dict[str, Any]) -> Empty:
    _allow(fields, ())
    return Empty()


def _parse_ping(fields: dict[str, Any]) -> Ping:
    _allow(fields, ("streams",))
    streams = fields.get("streams", [])
    if streams is None:
        return Ping()
    if not isinstance(streams, list) or len(streams) > MAX_ARRAY_LEN:
        raise bad_request(f"'streams' must be an array of at most {MAX_ARRAY_LEN} request ids, got {describe(streams)}.")
    return Ping(tuple(_ident({"streams": s}, "streams") for s in streams))


def _parse_npc_ref(fields: dict[str, Any]) -> NpcRef:
    _allow(fields, ("npc",))
    return NpcRef(_ident(fields, "npc"))


def _parse_upsert(fields: dict[str, Any]) -> NpcUpsert:
    _allow(fields, ("npc", "persona"))
    persona = fields.get("persona")
    if not isinstance(persona, dict):
        raise bad_request(f"'persona' must be a map of persona fields, got {describe(persona)}.")
    return NpcUpsert(_ident(fields, "npc"), persona)


def _parse_say(fields: dict[str, Any]) -> Say:
    _allow(fields, ("npc", "player", "text", "context", "max_new_tokens", "temperature", "top_p", "top_k", "seed",
                    "deadline_ms"))
    text = fields.get("text")
    if not isinstance(text, str) or not text.strip():
        raise bad_request(f"'text' must be a non-empty string, got {describe(text)}.")
    if len(text) > MAX_TEXT_CHARS:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"'text' is {len(text)} characters; the limit is {MAX_TEXT_CHARS}.")
    return Say(
        npc=_ident(fields, "npc"), text=text,
        player=_ident(fields, "player") if "player" in fields else "player",
        context=_context(fields.get("context", {})),
        max_new_tokens=_optional_int(fields, "max_new_tokens", 1, 1 << 20),
        temperature=_optional_float(fields, "temperature", 0.0, MAX_TEMPERATURE, low_open=False),
        top_p=_optional_float(fields, "top_p", 0.0, 1.0, low_open=True),
        top_k=_optional_int(fields, "top_k", 0, 1 << 20),
        seed=_optional_int(fields, "seed", 0, MAX_SEED),
        deadline_ms=_optional_int(fields, "deadline_ms", 1, MAX_DEADLINE_MS),
    )


def _parse_cancel(fields: dict[str, Any]) -> Cancel:
    _allow(fields, ("target",))
    return Cancel(_ident(fields, "target"))


def _player(fields: dict[str, Any]) -> str:
    return _ident(fields, "player") if "player" in fields else "player"


def _parse_memory_ref(fields: dict[str, Any]) -> MemoryRef:
    _allow(fields, ("npc", "player"))
    return MemoryRef(_ident(fields, "npc"), _player(fields))


def _parse_remember(fields: dict[str, Any]) -> MemoryRemember:
    _allow(fields, ("npc", "player", "fact"))
    fact = fields.get("fact")
    if not isinstance(fact, str) or not fact.strip():
        raise bad_request(f"'fact' must be a non-empty sentence, got {describe(fact)}.")
    if len(fact) > MAX_FACT_CHARS:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"'fact' is {len(fact)} characters; the limit is {MAX_FACT_CHARS}.")
    return MemoryRemember(_ident(fields, "npc"), fact, _player(fields))


def _parse_forget(fields: dict[str, Any]) -> MemoryForget:
    _allow(fields, ("npc", "player", "fact_id", "all"))
    fact_id = _optional_int(fields, "fact_id", 1, MAX_FACT_ID)
    every = fields.get("all", False)
    if type(every) is not bool:
        raise bad_request(f"'all' must be a boolean, got {describe(every)}.")
    if (fact_id is None) == (not every):
        raise bad_request("memory.forget takes either 'fact_id' (one fact) or 'all': true (every fact of the pair), "
                   "not both and not neither.")
    return MemoryForget(_ident(fields, "npc"), _player(fields), fact_id)


def _parse_clear(fields: dict[str, Any]) -> MemoryClear:
    _allow(fields, ("npc", "player"))
    return MemoryClear(_ident(fields, "npc"), _ident(fields, "player") if fields.get("player") is not None else None)


def _parse_export(fields: dict[str, Any]) -> SaveExport:
    _allow(fields, ("npc", "player"))
    return SaveExport(*(_ident(fields, name) if fields.get(name) is not None else None for name in ("npc", "player")))


def _parse_import(fields: dict[str, Any]) -> SaveImport:
    _allow(fields, ("save", "mode"))
    save = fields.get("save")
    if not isinstance(save, bytes) or not save:
        raise bad_request(f"'save' must be the bytes (msgpack bin) that save.export returned, got {describe(save)}.")
    mode = fields.get("mode", "replace")
    if mode not in SAVE_MODES:
        raise bad_request(f"'mode' must be one of {list(SAVE_MODES)}, got {describe(mode)}.")
    return SaveImport(save, mode)


_SAVE_IMPORT_OP = encode({"op": Op.SAVE_IMPORT.value})[1:]  # the key and value bytes, without the map header
_PARSERS: dict[Op, Callable[[dict[str, Any]], Params]] = {
    Op.HELLO: _parse_empty, Op.PING: _parse_ping, Op.NPC_LIST: _parse_empty, Op.STATS: _parse_empty,
    Op.NPC_GET: _parse_npc_ref, Op.NPC_UPSERT: _parse_upsert, Op.SAY: _parse_say, Op.CANCEL: _parse_cancel,
    Op.MEMORY_GET: _parse_memory_ref, Op.MEMORY_REMEMBER: _parse_remember, Op.MEMORY_FORGET: _parse_forget,
    Op.MEMORY_CLEAR: _parse_clear, Op.SAVE_EXPORT: _parse_export, Op.SAVE_IMPORT: _parse_import,
}


def _allow(fields: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        shown = [u[:40] for u in unknown[:5]]
        raise bad_request(f"Unknown field(s) {shown}; this op takes {list(allowed) or 'no fields'} besides v, id and op.")


def _ident(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ID_CHARS:
        raise bad_request(f"'{name}' must be a non-empty string of at most {MAX_ID_CHARS} characters, got {describe(value)}.")
    return value


def _optional_int(fields: dict[str, Any], name: str, low: int, high: int) -> int | None:
    if fields.get(name) is None:
        return None
    value = fields[name]
    if type(value) is not int or not low <= value <= high:
        raise bad_request(f"'{name}' must be an integer in [{low}, {high}], got {describe(value)}.")
    return value


def _optional_float(fields: dict[str, Any], name: str, low: float, high: float, *, low_open: bool) -> float | None:
    if fields.get(name) is None:
        return None
    value = fields[name]
    number = type(value) in (int, float) and math.isfinite(value)
    if not number or not (low < value if low_open else low <= value) or value > high:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise bad_request(f"'{name}' must be a number in {interval}, got {describe(value)}.")
    return float(value)


def _context(value: Any) -> dict[str, Any]:
    """``context``: string keys; values are strings, numbers, booleans or lists of strings."""
    if not isinstance(value, dict):
        raise bad_request(f"'context' must be a map of game state, got {describe(value)}.")
    if len(value) > MAX_CONTEXT_ENTRIES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"'context' has {len(value)} entries; the limit is {MAX_CONTEXT_ENTRIES}.")
    size = 0
    for key, item in value.items():
        items = item if isinstance(item, list) else [item]
        if not all(isinstance(i, CONTEXT_SCALARS) and not (isinstance(i, float) and not math.isfinite(i)) for i in items) \
                or (isinstance(item, list) and not all(isinstance(i, str) for i in item)):
            raise bad_request(f"context[{key[:40]!r}] must be a string, number, boolean or list of strings, got {describe(item)}.")
        size += len(key) + sum(len(str(i)) for i in items)
    if size > MAX_CONTEXT_CHARS:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"'context' holds {size} characters; the limit is {MAX_CONTEXT_CHARS}.")
    return dict(value)
