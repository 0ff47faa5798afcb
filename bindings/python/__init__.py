"""Game-side Python client for the npctalk ZeroMQ server (protocol v1: bindings/PROTOCOL.md).

    from npctalk.client import Client, AsyncClient

``Client`` blocks (and offers ``poll()`` for game loops: it never waits); ``AsyncClient`` awaits.
Both share one protocol core (``core.ClientCore``): same requests, same events, same errors
(``errors``: one class per server error code, plus ``ServerUnavailable`` when the server is gone).
"""

from npctalk.engine.security import CurveClientKeys

from .aio import AsyncClient, AsyncReply
from .client import Client, Reply
from .errors import (
    BadRequest, Busy, ClientClosed, ClientError, InternalServerError, ProtocolViolation, RequestTimeout, ServerError,
    ServerUnavailable, TooLarge, UnknownNpc, UnknownOp, UnsupportedVersion,
)
from .events import DoneEvent, ErrorEvent, Event, SayResult, Timings, TokenEvent, Usage

__all__ = [
    "AsyncClient", "AsyncReply", "BadRequest", "Busy", "Client", "ClientClosed", "ClientError", "CurveClientKeys", "DoneEvent",
    "ErrorEvent", "Event", "InternalServerError", "ProtocolViolation", "Reply", "RequestTimeout", "SayResult",
    "ServerError", "ServerUnavailable", "Timings", "TokenEvent", "TooLarge", "UnknownNpc", "UnknownOp",
    "UnsupportedVersion", "Usage",
]
