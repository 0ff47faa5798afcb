"""The wire format of protocol v1: names, limits, error codes, framing (one msgpack map per frame,
decoded within hard limits) and the reply messages.

``protocol.py`` is the front of the protocol: it re-exports everything here and adds the typed
requests of every op and their validation. Import from ``protocol``; this module exists so each
file holds one concept (framing and replies here, requests there). Stateless and thread-safe.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import msgpack

__all__ = [
    "PROTOCOL_VERSION", "SUPPORTED_VERSIONS", "DEFAULT_ENDPOINT", "MAX_REQUEST_BYTES",
    "MAX_SOCKET_MESSAGE_BYTES", "MAX_REPLY_BYTES", "MAX_ID_CHARS", "MAX_TEXT_CHARS", "MAX_CONTEXT_ENTRIES",
    "MAX_CONTEXT_CHARS", "MAX_DEPTH", "MAX_ARRAY_LEN", "MAX_MAP_LEN", "MAX_SEED", "MAX_TEMPERATURE",
    "MAX_DEADLINE_MS", "MAX_FACT_CHARS", "MAX_SAVE_BYTES", "MAX_FACT_ID", "SAVE_MODES", "Op", "MessageType",
    "ErrorCode", "FINISH_REASONS", "ProtocolError", "encode", "decode", "bad_request", "describe", "ok",
    "token", "done", "error", "parse_reply",
]

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"

# --- limits (bytes, characters, counts) ------------------------------------------------------------
MAX_REQUEST_BYTES = 64 * 1024      # a larger request frame is answered with too_large
MAX_SOCKET_MESSAGE_BYTES = 1 << 20  # ZMQ_MAXMSGSIZE: libzmq drops a peer that sends more (no reply possible)
MAX_REPLY_BYTES = 1 << 20          # what a client accepts from the server
MAX_ID_CHARS = 64                  # request ids, NPC ids, player ids
MAX_TEXT_CHARS = 4000              # a player's line; longer is too_large
MAX_CONTEXT_ENTRIES = 16
MAX_CONTEXT_CHARS = 2000           # all keys and values of ``context`` together
MAX_DEPTH = 8                      # nesting of maps/arrays in one message; the request map is depth 1
                                   # (a Character Card V2 with a character_book in npc.upsert nests 7)
MAX_ARRAY_LEN = 256
MAX_MAP_LEN = 64
MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 5.0
MAX_DEADLINE_MS = 3_600_000        # a say's own deadline_ms; the server's --request-timeout still caps it
MAX_FACT_CHARS = 300               # a fact given to memory.remember
MAX_SAVE_BYTES = 1000 * 1024       # a save.import frame (and the blob save.export returns) may be this large
MAX_FACT_ID = 2**63 - 1
SAVE_MODES = ("replace", "merge")


class Op(enum.StrEnum):
    HELLO = "hello"
    PING = "ping"
    NPC_UPSERT = "npc.upsert"
    NPC_GET = "npc.get"
    NPC_LIST = "npc.list"
    SAY = "say"
    CANCEL = "cancel"
    STATS = "stats"
    MEMORY_GET = "memory.get"
    MEMORY_REMEMBER = "memory.remember"
    MEMORY_FORGET = "memory.forget"
    MEMORY_CLEAR = "memory.clear"
    SAVE_EXPORT = "save.export"
    SAVE_IMPORT = "save.import"


class MessageType(enum.StrEnum):
    OK = "ok"
    TOKEN = "token"
    DONE = "done"
    ERROR = "error"


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"                  # not a valid request: shape, types, unknown fields
    UNSUPPORTED_VERSION = "unsupported_version"  # ``v`` is not a version this server speaks
    UNKNOWN_OP = "unknown_op"
    UNKNOWN_NPC = "unknown_npc"
    TOO_LARGE = "too_large"                      # frame, text or prompt over a limit
    BUSY = "busy"                                # queue full or server shutting down: retry later
    TIMEOUT = "timeout"                          # the request's deadline passed
    INTERNAL = "internal"                        # a server bug; the server keeps running


FINISH_REASONS = ("stop", "length", "cancelled")


class ProtocolError(Exception):
    """A request (or reply) that breaks the protocol: ``code`` and a sentence to send back.

    ``request_id`` is the offending request's id when it could be read, else None.
    """

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


# --- decoding ---------------------------------------------------------------------------------------


def encode(message: Mapping[str, Any]) -> bytes:
    """One message → one frame."""
    return msgpack.packb(message, use_bin_type=True)


def decode(frame: bytes, *, max_bytes: int = MAX_REQUEST_BYTES) -> dict[str, Any]:
    """One frame → one map, within the limits above; ``ProtocolError`` otherwise."""
    if len(frame) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"The message is {len(frame)} bytes; the limit is {max_bytes}.")
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=True, max_buffer_size=max_bytes, max_str_len=max_bytes, max_bin_len=max_bytes,
        max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN, max_ext_len=0,
    )
    try:
        unpacker.feed(frame)
        message = unpacker.unpack()
        trailing = unpacker.tell() != len(frame)
    except msgpack.OutOfData:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "The message is truncated msgpack.") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # FormatError, StackError, limits, invalid UTF-8 and non-string map keys all land here.
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"The message is not valid msgpack within the limits: {exc}.") from None
    if not isinstance(message, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"A message must be a msgpack map, got {type(message).__name__}.")
    if trailing:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "The frame holds bytes after its msgpack map; send one map per frame.")
    problem = _shape_problem(message)
    if problem:
        raise ProtocolError(ErrorCode.BAD_REQUEST, problem)
    return message


def _shape_problem(value: Any) -> str | None:
    """Nesting deeper than ``MAX_DEPTH`` or a non-string map key, found iteratively (a hostile
    message must not exhaust the stack); None when the message is fine."""
    todo = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            if not all(isinstance(key, str) for key in item):
                return "Every map key must be a UTF-8 string (str), not bin."
            children: list[Any] = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_DEPTH:
            return f"The message nests maps/arrays more than {MAX_DEPTH} levels deep."
        todo.extend((child, depth + 1) for child in children)
    return None


# --- error messages ---------------------------------------------------------------------------------


def bad_request(message: str) -> ProtocolError:
    """A ``bad_request`` error with ``message``."""
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def describe(value: Any) -> str:
    """``value`` in a few words for an error message (never its whole length)."""
    if value is None:
        return "nothing"
    if isinstance(value, (str, bytes)) and len(value) > 40:
        return f"a {type(value).__name__} of length {len(value)}"
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


# --- replies ----------------------------------------------------------------------------------------


def ok(request_id: str, **fields: Any) -> dict[str, Any]:
    return {"type": MessageType.OK.value, "id": request_id, **fields}


def token(request_id: str, seq: int, text: str) -> dict[str, Any]:
    return {"type": MessageType.TOKEN.value, "id": request_id, "seq": seq, "text": text}


def done(request_id: str, seq: int, text: str, finish_reason: str, *, prompt_tokens: int, completion_tokens: int,
         queue_ms: float, ttft_ms: float | None, total_ms: float) -> dict[str, Any]:
    """The terminal message of a ``say``; ``ttft_ms`` is nil when no token was generated."""
    return {
        "type": MessageType.DONE.value, "id": request_id, "seq": seq, "text": text, "finish_reason": finish_reason,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        "timings": {"queue_ms": round(queue_ms, 3), "ttft_ms": None if ttft_ms is None else round(ttft_ms, 3),
                    "total_ms": round(total_ms, 3)},
    }


def error(request_id: str | None, code: ErrorCode, message: str, *, seq: int | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"type": MessageType.ERROR.value, "id": request_id, "code": code.value, "message": message}
    if seq is not None:
        reply["seq"] = seq
    return reply


_REPLY_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    MessageType.OK: {},
    MessageType.TOKEN: {"seq": int, "text": str},
    MessageType.DONE: {"seq": int, "text": str, "finish_reason": str, "usage": dict, "timings": dict},
    MessageType.ERROR: {"code": str, "message": str},
}


def parse_reply(frame: bytes) -> dict[str, Any]:
    """Client side: a server frame → its map, checked for its type's required fields.

    Raises ``ProtocolError`` (code ``bad_request`` from the client's point of view: the server sent
    something this client cannot read).
    """
    message = decode(frame, max_bytes=MAX_REPLY_BYTES)
    kind = message.get("type")
    if kind not in _REPLY_FIELDS:
        raise bad_request(f"Reply type {describe(kind)} is not one of {list(_REPLY_FIELDS)}.")
    if not (message.get("id") is None or isinstance(message.get("id"), str)):
        raise bad_request(f"Reply 'id' must be a string or nil, got {describe(message.get('id'))}.")
    for name, expected in _REPLY_FIELDS[kind].items():
        if not isinstance(message.get(name), expected) or isinstance(message.get(name), bool):
            raise bad_request(f"A {kind} reply needs '{name}' of type {expected}, got {describe(message.get(name))}.")
    if kind == MessageType.DONE and message["finish_reason"] not in FINISH_REASONS:
        raise bad_request(f"Unknown finish_reason {message['finish_reason']!r}.")
    return message
