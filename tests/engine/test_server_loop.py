"""The server loop's turn between two engine steps, in process: how much it answers at once."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import zmq

from npctalk.engine import server as server_module
from npctalk.engine.model import Model
from npctalk.engine.server import Server, ServerConfig


def test_a_turn_answers_messages_for_a_bounded_time_and_loses_none(gpt2_model: Model, tmp_path: Path) -> None:
    """Twenty messages that each take 1 ms to answer: one turn answers a couple (its time budget is
    2 ms), so a burst of says cannot hold the running streams' next step; the rest are answered, in
    order, on the following turns."""
    server = Server(gpt2_model, ServerConfig(bind=f"ipc://{tmp_path}/npctalk.sock"))
    handled: list[str] = []

    def slow(identity: bytes, frames: list[bytes]) -> None:
        time.sleep(0.001)
        handled.append(msgpack.unpackb(frames[0])["id"])

    server.handlers.handle = slow  # type: ignore[method-assign]
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    try:
        dealer.connect(server.endpoint)
        for i in range(20):
            dealer.send(msgpack.packb({"v": 1, "id": f"m{i}", "op": "ping"}))
        time.sleep(0.3)  # all twenty are in the server's socket
        server._receive(0)
        most = int(server_module.RECEIVE_BUDGET_S / 0.001) + 1
        assert 1 <= len(handled) <= most, f"one turn answered {len(handled)} messages"
        deadline = time.monotonic() + 10
        while len(handled) < 20 and time.monotonic() < deadline:
            server._receive(50)  # the next turns (waiting up to 50 ms for a late message)
        assert handled == [f"m{i}" for i in range(20)]
    finally:
        dealer.close(linger=0)
        server._socket.close(linger=0)
        server.memory.close()
