"""The real server while a long prompt joins: running streams and pings are served between its chunks.

One DEALER carries every request, so the order in which messages arrive is the order the server sent
them. The long prompts are the built-in personas' (about 300 tokens on the tiny GPT-2), cold in the
prefix cache, prefilled 2 tokens per engine step.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from server_process import LONG_STREAMS, ServerProcess, recv, send

MIRA = {"name": "Mira", "role": "a herbalist"}  # short: her stream is the running one
ARGS = (*LONG_STREAMS, "--max-new-tokens", "700", "--prefill-chunk", "2")
_polls = itertools.count()


@pytest.fixture(scope="module")
def server(gpt2_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(gpt2_bundle, tmp_path_factory.mktemp("chunked"), *ARGS).start()
    try:
        assert proc.request("npc.upsert", npc="mira", persona=MIRA)["type"] == "ok"
        yield proc
    finally:
        proc.stop()


class Log:
    """Every message read from one socket, in arrival order."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock, self.messages = sock, list[dict[str, Any]]()

    def read_until(self, done: Any, timeout: float = 20.0) -> dict[str, Any]:
        """Read until a message satisfies ``done``; returns it."""
        while True:
            message = recv(self.sock, timeout)
            self.messages.append(message)
            if done(message):
                return message

    def index(self, rid: str, kind: str) -> int:
        return next(i for i, m in enumerate(self.messages) if m.get("id") == rid and m["type"] == kind)

    def wait_for_prefill(self, timeout: float = 10.0) -> int:
        """Poll ``stats`` until a request is being prefilled; the index of that stats reply."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rid = f"stats-{next(_polls)}"
            send(self.sock, op="stats", id=rid)
            reply = self.read_until(lambda m, rid=rid: m.get("id") == rid)
            assert reply["type"] == "ok" and "prefilling" in reply and reply["prefill_chunk"] == 2
            if reply["prefilling"] >= 1:
                assert reply["active"] >= reply["prefilling"], "a prefilling request counts as active"
                return len(self.messages) - 1
        raise AssertionError(f"stats never showed a request being prefilled within {timeout} s")


def _start_running_stream(log: Log, rid: str) -> None:
    send(log.sock, op="say", id=rid, npc="mira", player=f"p-{rid}", text="Hello!", max_new_tokens=650)
    log.read_until(lambda m: m.get("id") == rid and m["type"] == "token")


def _finish(log: Log, rid: str) -> dict[str, Any]:
    send(log.sock, op="cancel", id=f"cancel-{rid}", target=rid)
    return log.read_until(lambda m: m.get("id") == rid and m["type"] in ("done", "error"))


def test_running_stream_and_ping_are_served_between_the_chunks_of_a_long_prompt(server: ServerProcess) -> None:
    log = Log(server.dealer())
    _start_running_stream(log, "a")
    send(log.sock, op="say", id="b", npc="bram", player="p-long", text="What do you sell?", max_new_tokens=4)
    seen_prefilling = log.wait_for_prefill()
    send(log.sock, op="ping", id="pg")
    log.read_until(lambda m: m.get("id") == "b" and m["type"] == "token")
    pong, first_b = log.index("pg", "ok"), log.index("b", "token")
    assert seen_prefilling < pong < first_b, "the ping was answered while the long prompt was still prefilling"
    between = [m for m in log.messages[seen_prefilling:first_b] if m.get("id") == "a" and m["type"] == "token"]
    assert len(between) >= 10, f"stream a kept streaming during the prefill ({len(between)} tokens)"
    assert [m["seq"] for m in between] == list(range(between[0]["seq"], between[0]["seq"] + len(between)))
    done_b = log.read_until(lambda m: m.get("id") == "b" and m["type"] in ("done", "error"))
    assert done_b["type"] == "done" and done_b["usage"]["prompt_tokens"] > 200
    done_a = _finish(log, "a")
    assert done_a["type"] == "done" and done_a["usage"]["completion_tokens"] > len(between)


def test_cancel_during_prefill_ends_it_and_remembers_nothing(server: ServerProcess) -> None:
    log = Log(server.dealer())
    _start_running_stream(log, "run")
    send(log.sock, op="say", id="c", npc="elda", player="p-cancelled", text="Tell me a secret.", max_new_tokens=50)
    log.wait_for_prefill()
    send(log.sock, op="cancel", id="x", target="c")
    done = log.read_until(lambda m: m.get("id") == "c" and m["type"] in ("done", "error"))
    assert [m["type"] for m in log.messages if m.get("id") == "c"] == ["done"], "no token came before the cancel"
    assert done["finish_reason"] == "cancelled" and done["text"] == "" and done["usage"]["completion_tokens"] == 0
    assert done["timings"]["ttft_ms"] is None
    assert log.messages[log.index("x", "ok")]["found"] is True
    assert server.request("memory.get", npc="elda", player="p-cancelled")["turns"] == []
    assert _finish(log, "run")["type"] == "done"
    stats = server.stats()
    assert (stats["active"], stats["prefilling"], stats["queued"]) == (0, 0, 0)
