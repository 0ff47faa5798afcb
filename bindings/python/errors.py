"""Every exception the npctalk client raises, in one tree; server error codes map one-to-one.

    ClientError
    ├── ServerError              the server answered with an error message (``code``, ``request_id``)
    │   ├── BadRequest           bad_request          the request broke the protocol
    │   ├── UnsupportedVersion   unsupported_version  the server speaks another protocol version
    │   ├── UnknownOp            unknown_op
    │   ├── UnknownNpc           unknown_npc          register the NPC with upsert_npc first
    │   ├── TooLarge             too_large            text, context or prompt over a limit
    │   ├── Busy                 busy                 queue full or shutting down: retry later
    │   ├── RequestTimeout       timeout              the server's deadline for the request passed
    │   └── InternalServerError  internal             a server bug; the server keeps running
    ├── ServerUnavailable        no message from the server within ``timeout`` (after every retry for
    │                            requests; at once for a reply that was streaming)
    ├── ProtocolViolation        the server sent something this client cannot read (bad frame, seq gap)
    └── ClientClosed             the client was used after ``close()``

Catch ``ClientError`` for all of them, ``ServerError`` for answers, ``Busy`` to back off.
"""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Base of every npctalk client error."""


class ServerError(ClientError):
    """The server answered a request with ``{type: "error"}``."""

    code = "internal"

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class BadRequest(ServerError):
    code = "bad_request"


class UnsupportedVersion(ServerError):
    code = "unsupported_version"


class UnknownOp(ServerError):
    code = "unknown_op"


class UnknownNpc(ServerError):
    code = "unknown_npc"


class TooLarge(ServerError):
    code = "too_large"


class Busy(ServerError):
    code = "busy"


class RequestTimeout(ServerError):
    code = "timeout"


class InternalServerError(ServerError):
    code = "internal"


class ServerUnavailable(ClientError):
    """The server stayed silent past the client's timeout (it is down, unreachable or hung)."""


class ProtocolViolation(ClientError):
    """The server sent a frame that breaks protocol v1."""


class ClientClosed(ClientError):
    """The client was used after ``close()``."""


ERRORS_BY_CODE: dict[str, type[ServerError]] = {
    cls.code: cls for cls in (BadRequest, UnsupportedVersion, UnknownOp, UnknownNpc, TooLarge, Busy, RequestTimeout,
                              InternalServerError)
}


def error_from_reply(reply: dict[str, Any]) -> ServerError:
    """The exception for an ``error`` reply (an unknown code becomes a plain ``ServerError``)."""
    cls = ERRORS_BY_CODE.get(reply.get("code", ""), ServerError)
    error = cls(f"{reply.get('code')}: {reply.get('message')}", reply.get("id"))
    if cls is ServerError:
        error.code = str(reply.get("code"))
    return error
