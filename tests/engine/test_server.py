"""The real server over loopback TCP: streaming, cancel, hostile input, busy, stuck clients, SIGTERM."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from server_process import LONG_STREAMS, ServerProcess, collect, collect_all, recv, send

MIRA = {"name": "Mira", "role": "a herbalist"}  # a short persona: long replies fit the tiny context
ARGS = (*LONG_STREAMS, "--max-new-tokens", "960", "--max-batch", "4", "--max-queue", "4")


@pytest.fixture(scope="module")
def server(gpt2_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(gpt2_bundle, tmp_path_factory.mktemp("server"), *ARGS).start()
    try:
        assert proc.request("npc.upsert", npc="mira", persona=MIRA)["type"] == "ok"
        yield proc
    finally:
        proc.stop()


def wait_for_stats(server: ServerProcess, check: Any, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats = server.stats()
        if check(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)  # poll interval


def check_stream(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """seq 0.. without gaps, one terminal message last, tokens joined == done.text; returns the terminal."""
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    assert [m["type"] for m in messages[:-1]] == ["token"] * (len(messages) - 1)
    assert messages[-1]["type"] in ("done", "error")
    if messages[-1]["type"] == "done":
        assert "".join(m["text"] for m in messages[:-1]) == messages[-1]["text"]
    return messages[-1]


def test_hello_describes_server_and_model(server: ServerProcess) -> None:
    hello = server.request("hello")
    assert hello["type"] == "ok" and hello["protocol"] == 1 and hello["model"]["architecture"] == "gpt2"
    assert hello["capabilities"]["batching"] is True and "say" in hello["capabilities"]["ops"]
    assert {n["npc"] for n in server.request("npc.list")["npcs"]} >= {"bram", "elda", "tobin", "mira"}
    # How the engine runs, for a game developer checking its settings: as started by ServerProcess.
    model = hello["model"]
    assert (model["dtype"], model["threads"], model["spin"], model["inplace_kv"]) == ("fp32", 1, False, True)


def test_serve_leaves_a_core_for_the_game_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    from npctalk.engine.cli import server_threads

    for cores, expected in ((1, 1), (2, 1), (8, 7), (None, 1)):
        monkeypatch.setattr("os.cpu_count", lambda c=cores: c)
        assert server_threads(None) == expected
    assert server_threads(3) == 3


def test_spin_reaches_the_engine(gpt2_bundle: Path, tmp_path: Path) -> None:
    proc = ServerProcess(gpt2_bundle, tmp_path, "--spin").start()
    try:
        assert proc.request("hello")["model"]["spin"] is True
    finally:
        proc.stop()


def test_two_npcs_stream_at_once_interleaved(server: ServerProcess) -> None:
    sock = server.dealer()
    send(sock, op="say", id="a", npc="mira", player="p-inter", text="Hello!", max_new_tokens=60)
    send(sock, op="say", id="b", npc="bram", player="p-inter", text="Hello!", max_new_tokens=60)
    order, streams = [], {"a": [], "b": []}
    while not all(s and s[-1]["type"] in ("done", "error") for s in streams.values()):
        message = recv(sock)
        order.append(message["id"])
        streams[message["id"]].append(message)
    for messages in streams.values():
        done = check_stream(messages)
        assert done["type"] == "done" and done["finish_reason"] == "length"
        assert done["usage"]["completion_tokens"] == 60 and done["timings"]["ttft_ms"] <= done["timings"]["total_ms"]
    switches = sum(1 for x, y in zip(order, order[1:]) if x != y)
    assert switches > 10, f"the two streams did not interleave: {''.join(order)}"


def test_cancel_ends_the_stream_with_cancelled(server: ServerProcess) -> None:
    sock = server.dealer()
    send(sock, op="say", id="long", npc="mira", player="p-cancel", text="Hello!", max_new_tokens=900)
    first = recv(sock)
    assert first["type"] == "token" and first["seq"] == 0
    send(sock, op="cancel", id="c1", target="long")
    messages, ack = [first], None
    while not messages[-1]["type"] == "done":
        message = recv(sock)
        if message["id"] == "c1":
            ack = message
        else:
            messages.append(message)
    done = check_stream(messages)
    assert done["finish_reason"] == "cancelled" and done["usage"]["completion_tokens"] < 900
    if ack is None:
        ack = recv(sock)
    assert ack == {"type": "ok", "id": "c1", "target": "long", "found": True}
    send(sock, op="cancel", id="c2", target="long")  # already over
    assert recv(sock)["found"] is False


HOSTILE: list[tuple[str, list[bytes], str]] = [
    ("garbage bytes", [b"\xc1\xff\x00garbage"], "bad_request"),
    ("not a map", [msgpack.packb([1, 2, 3])], "bad_request"),
    ("a bare string", [msgpack.packb("say hello")], "bad_request"),
    ("two frames", [msgpack.packb({"v": 1, "id": "x", "op": "ping"}), b"extra"], "bad_request"),
    ("wrong types", [msgpack.packb({"v": 1, "id": "t", "op": "say", "npc": 5, "text": ["hi"]})], "bad_request"),
    ("unknown field", [msgpack.packb({"v": 1, "id": "u", "op": "say", "npc": "mira", "text": "hi", "evil": 1})],
     "bad_request"),
    ("unknown op", [msgpack.packb({"v": 1, "id": "o", "op": "shell"})], "unknown_op"),
    ("future version", [msgpack.packb({"v": 99, "id": "v", "op": "ping"})], "unsupported_version"),
    ("bin keys", [msgpack.packb({b"v": 1, b"id": b"k", b"op": b"ping"}, use_bin_type=True)], "bad_request"),
    ("deep nesting", [b"\x83\xa1v\x01\xa2id\xa1d\xa2op" + b"\x91" * 50_000 + b"\xc0"], "bad_request"),
    ("100 KB frame", [msgpack.packb({"v": 1, "id": "big", "op": "say", "npc": "mira", "text": "x" * 100_000})],
     "too_large"),
    ("unknown npc", [msgpack.packb({"v": 1, "id": "n", "op": "say", "npc": "ghost", "text": "boo"})], "unknown_npc"),
    ("text too long", [msgpack.packb({"v": 1, "id": "l", "op": "say", "npc": "mira", "text": "y" * 5000})],
     "too_large"),
]


def test_hostile_input_gets_error_replies_while_a_good_stream_keeps_going(server: ServerProcess) -> None:
    good = server.dealer()
    send(good, op="say", id="good", npc="mira", player="p-hostile", text="Hello!", max_new_tokens=900)
    first = recv(good)
    assert first["type"] == "token"
    hostile = server.dealer()
    for name, frames, code in HOSTILE:
        hostile.send_multipart(frames)
        reply = recv(hostile)
        assert (reply["type"], reply["code"]) == ("error", code), name
        assert reply["message"].endswith("."), name
    stats = server.stats()
    assert stats["active"] >= 1 and stats["internal_errors"] == 0, "the good stream is still running"
    # Beyond ZMQ_MAXMSGSIZE libzmq drops the sender's connection: no reply, and nothing else breaks.
    huge = server.dealer()
    huge.send(b"\x00" * (2 << 20))
    assert not huge.poll(300)
    done = check_stream([first] + collect(good, "good"))
    assert done["type"] == "done" and done["finish_reason"] == "length"
    assert server.request("ping")["type"] == "ok" and server.running


def test_flood_past_capacity_is_answered_busy_fast(server: ServerProcess) -> None:
    sock = server.dealer()
    sent_at = {}
    for i in range(30):
        sent_at[f"f{i}"] = time.monotonic()
        send(sock, op="say", id=f"f{i}", npc="mira", player=f"p-flood{i}", text="Hi", max_new_tokens=300)
    busy, delays = 0, []
    terminal: set[str] = set()
    while len(terminal) < 30:
        message = recv(sock)
        if message["type"] == "error" and message["code"] == "busy":
            busy += 1
            delays.append(time.monotonic() - sent_at[message["id"]])
            assert message["seq"] == 0
        if message["type"] in ("done", "error"):
            terminal.add(message["id"])
        elif message["type"] == "token" and message["seq"] == 0:
            send(sock, op="cancel", id=f"c-{message['id']}", target=message["id"])  # free the slots again
    assert busy >= 30 - 8, "capacity is max_batch 4 + max_queue 4"
    assert max(delays) < 1.0, f"busy took {max(delays):.3f} s"
    assert wait_for_stats(server, lambda s: s["active"] == 0 and s["queued"] == 0)["busy"] >= busy


def test_a_client_that_vanishes_mid_stream_has_its_stream_cancelled(server: ServerProcess) -> None:
    before = server.stats()
    sock = server.dealer()
    send(sock, op="say", id="v", npc="mira", player="p-vanish", text="Hello!", max_new_tokens=900)
    assert recv(sock)["type"] == "token"
    sock.close(linger=0)  # the connection drops: ROUTER_MANDATORY sends now fail with EHOSTUNREACH
    stats = wait_for_stats(server, lambda s: s["cancelled"] > before["cancelled"] and s["active"] == 0)
    assert stats["cancelled"] == before["cancelled"] + 1 and stats["clients_dropped"] == before["clients_dropped"] + 1
    assert stats["tokens"] - before["tokens"] < 900
    assert "is gone" in server.log()


@pytest.fixture(scope="module")
def small_buffers_server(gpt2_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Tiny per-client send queues, so a client that stops reading is noticed within a few hundred tokens."""
    proc = ServerProcess(gpt2_bundle, tmp_path_factory.mktemp("server"), *ARGS, "--send-hwm", "20",
                         "--send-buffer", "4096").start()
    try:
        assert proc.request("npc.upsert", npc="mira", persona=MIRA)["type"] == "ok"
        yield proc
    finally:
        proc.stop()


def test_a_client_that_stops_reading_is_cancelled_and_memory_stays_bounded(small_buffers_server: ServerProcess) -> None:
    server = small_buffers_server
    before = server.stats()
    stuck = server.dealer(RCVHWM=1, RCVBUF=1024)
    for i in range(4):
        send(stuck, op="say", id=f"s{i}", npc="mira", player=f"p-stuck{i}", text="Hello!", max_new_tokens=900)
    # It keeps pinging (so it is alive) but never reads: its queue fills and the server gives up on it.
    deadline = time.monotonic() + 15
    stats = before
    while time.monotonic() < deadline:
        send(stuck, op="ping", id="alive")
        stats = server.stats()
        if stats["clients_dropped"] > before["clients_dropped"] and stats["active"] == 0:
            break
        time.sleep(0.1)  # poll interval
    assert stats["clients_dropped"] == before["clients_dropped"] + 1, stats
    assert stats["cancelled"] >= before["cancelled"] + 4 and stats["active"] == stats["queued"] == 0
    assert stats["tokens"] - before["tokens"] < 4 * 900, "the streams were cut, not generated to the end"
    assert "is not reading" in server.log()


def test_a_client_that_goes_silent_has_its_streams_cancelled(gpt2_bundle: Path, tmp_path: Path) -> None:
    # 0.2 s of silence: the tiny model streams a 900-token reply in ~0.15 s on a fast VM (0.5 s let 5 of
    # the 8 finish there), so most of the 8 are still queued or running when the client is given up.
    proc = ServerProcess(gpt2_bundle, tmp_path, *LONG_STREAMS, "--max-new-tokens", "960", "--max-batch", "1",
                         "--client-timeout", "0.2").start()
    try:
        proc.request("npc.upsert", npc="mira", persona=MIRA)
        silent = proc.dealer()
        for i in range(8):  # one at a time: over a second of work
            send(silent, op="say", id=f"q{i}", npc="mira", player=f"p-silent{i}", text="Hello!", max_new_tokens=900)
        streams = collect_all(silent, [f"q{i}" for i in range(8)])  # it reads, but never sends again
        ends = [check_stream(messages) for messages in streams.values()]
        assert all(e["type"] == "done" for e in ends)
        assert sum(e["finish_reason"] == "cancelled" for e in ends) >= 4
        assert proc.stats()["clients_dropped"] == 1
        assert "sent nothing for" in proc.log()
    finally:
        proc.stop()


def test_context_and_history_enter_the_prompt(server: ServerProcess) -> None:
    sock = server.dealer()

    def prompt_tokens(request_id: str, **fields: Any) -> int:
        send(sock, op="say", id=request_id, npc="mira", text="Hello!", max_new_tokens=5, **fields)
        return check_stream(collect(sock, request_id))["usage"]["prompt_tokens"]

    bare = prompt_tokens("h1", player="p-history-a")
    assert prompt_tokens("h2", player="p-history-b", context={"location": "the forge", "weather": "rain"}) > bare
    assert prompt_tokens("h3", player="p-history-a") > bare  # the first exchange is remembered
    assert prompt_tokens("h4", player="p-history-c") == bare  # other players' history is theirs


def test_npc_ops(server: ServerProcess) -> None:
    assert server.request("npc.upsert", npc="olaf", persona={"name": "Olaf", "role": "a miller"})["created"] is True
    assert server.request("npc.upsert", npc="olaf", persona={"name": "Olaf", "role": "a baker"})["created"] is False
    assert server.request("npc.get", npc="olaf")["persona"] == {"name": "Olaf", "role": "a baker"}
    assert server.request("npc.get", npc="nobody")["code"] == "unknown_npc"
    bad = server.request("npc.upsert", npc="x", persona={"name": "X"})
    assert bad["code"] == "bad_request" and "role" in bad["message"]
    huge = server.request("npc.upsert", npc="y", persona={"name": "Y", "role": "r", "background": ["lore " * 300] * 5})
    assert huge["code"] == "too_large"


def test_sigterm_mid_stream_exits_cleanly(gpt2_bundle: Path, tmp_path: Path) -> None:
    proc = ServerProcess(gpt2_bundle, tmp_path, *LONG_STREAMS, "--max-new-tokens", "960", "--drain-timeout", "0.3").start()
    try:
        sock = proc.dealer()
        proc.request("npc.upsert", npc="mira", persona=MIRA)
        send(sock, op="say", id="s", npc="mira", text="Hello!", max_new_tokens=900)
        first = recv(sock)
        assert first["type"] == "token"
        proc.signal(signal.SIGTERM)
        done = check_stream([first] + collect(sock, "s"))
        assert done["type"] == "done" and done["finish_reason"] in ("length", "cancelled")
        assert proc.wait(timeout=10) == 0
        assert "stopped" in proc.log()
    finally:
        proc.stop()


def test_ipc_endpoint_and_request_deadline(gpt2_bundle: Path, tmp_path: Path) -> None:
    proc = ServerProcess(gpt2_bundle, tmp_path, *LONG_STREAMS, "--max-new-tokens", "960", "--request-timeout", "0.02",
                         endpoint=f"ipc://{tmp_path}/npctalk.sock").start()
    try:
        sock = proc.dealer()
        proc.request("npc.upsert", npc="mira", persona=MIRA)
        send(sock, op="say", id="slow", npc="mira", text="Hello!", max_new_tokens=900)
        end = check_stream(collect(sock, "slow"))
        assert (end["type"], end["code"]) == ("error", "timeout") and "deadline" in end["message"]
        assert proc.stats()["failed"] == 1
    finally:
        proc.stop()
