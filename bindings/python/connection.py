"""The socket half both clients share: a DEALER socket, sends, draining replies, Lazy Pirate reconnects.

``Client`` waits on ``socket.poll`` directly; ``AsyncClient`` creates the socket from an asyncio
context and awaits its ``poll``. Sends and receives are never blocking here, so both go through
a plain (synchronous) view of the same libzmq socket. Not thread-safe.
"""

from __future__ import annotations

import logging

import zmq
import zmq.asyncio

from npctalk.engine.protocol import MAX_REPLY_BYTES
from npctalk.engine.security import CurveClientKeys

from .core import ClientCore
from .errors import ServerUnavailable

log = logging.getLogger(__name__)


class Connection:
    """``socket`` (sync or asyncio, for polling) connected to ``endpoint``, driven by ``core``."""

    def __init__(self, context: zmq.Context, endpoint: str, core: ClientCore, curve: CurveClientKeys | None = None) -> None:
        self.context, self.endpoint, self.core, self.curve = context, endpoint, core, curve
        self.socket, self._io = self._open()

    def _open(self) -> tuple[zmq.Socket, zmq.Socket]:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)  # Lazy Pirate: a closed socket drops what it still queues
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(self.core.heartbeat * 1000))  # ZMTP: drops a dead TCP peer
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.core.heartbeat * 3000))
        if self.curve:
            self.curve.apply(sock)  # every reconnect is a CURVE client again
        sock.connect(self.endpoint)
        # asyncio sockets return futures from send/recv; a plain view of the same socket does not.
        plain = zmq.Socket.shadow(sock.underlying) if isinstance(sock, zmq.asyncio.Socket) else sock
        return sock, plain

    def wait_ms(self) -> int:
        """How long the shell may wait for a frame before the core needs a ``service``."""
        wakeup = self.core.next_wakeup()
        return int(1000 * (wakeup if wakeup is not None else self.core.heartbeat)) + 1

    def drain(self) -> None:
        """Feed every frame that has arrived to the core, without waiting."""
        while True:
            try:
                frame = self._io.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.core.feed(frame)

    def service(self) -> None:
        """Do what the core's clock asks: heartbeats, and reconnecting when the server went silent."""
        tick = self.core.tick()
        if tick.reconnect:
            log.info("No answer from %s within %g s: reconnecting.", self.endpoint, self.core.timeout)
            self.socket.close(linger=0)
            self.socket, self._io = self._open()
            tick.frames.extend(self.core.reconnected())
        for frame in tick.frames:
            self.send(frame)

    def send(self, frame: bytes) -> None:
        try:
            self._io.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            raise ServerUnavailable(f"Cannot queue a message for {self.endpoint}: the send queue is full "
                                    "(the server has not read for a long time).") from None
        self.core.sent()

    def close(self) -> None:
        self.core.close()
        self.socket.close(linger=0)
