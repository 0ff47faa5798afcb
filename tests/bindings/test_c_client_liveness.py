"""The C client's API and liveness against real and scripted servers: callbacks that re-enter or
close the client, concurrent replies, a server that is down, freezes, drops the connection or stays
silent while the game stalls. `api_checks.c` drives the API directly; `talk` the rest.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import msgpack
import pytest

from c_harness import BUILDABLE, MIRA, Built, read_line, status_numbers, talk
from server_process import ServerProcess, free_tcp_endpoint

pytestmark = BUILDABLE


@pytest.mark.parametrize("check", ["arguments", "concurrent", "reentry", "close", "call"])
def test_api_behaviour(built: Built, server: ServerProcess, check: str) -> None:
    """arguments: bad input fails at once with a sentence. concurrent: four replies on one client.
    reentry: a callback starts a reply; blocking calls and poll from callbacks are refused.
    close: npctalk_close inside a callback is deferred and safe (ASan would catch a use after free).
    call: npctalk_call reaches npc.list, npc.get, stats; unknown_npc and unknown_op map to their codes."""
    done = subprocess.run([str(built.api_checks), server.endpoint, check], capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.returncode == 0 and done.stdout.endswith("ok\n"), done.stdout + done.stderr


def test_the_same_client_recovers_after_the_server_froze(built: Built, server: ServerProcess) -> None:
    process = subprocess.Popen([str(built.api_checks), server.endpoint, "recover"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None
    try:
        assert read_line(process, 20) == "streaming"
        server.signal(signal.SIGSTOP)
        try:
            assert read_line(process, 5) == "lost"  # 0.6 s client timeout
        finally:
            server.signal(signal.SIGCONT)
        process.stdin.write(b"go\n")
        process.stdin.flush()
        code = process.wait(30)
        rest = read_line(process, 1) if code == 0 else process.stdout.read().decode()  # type: ignore[union-attr]
        assert code == 0 and rest == "ok", rest + (process.stderr.read().decode() if process.stderr else "")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_reply_lost_when_the_connection_drops_fails_instead_of_hanging(built: Built, server: ServerProcess) -> None:
    """The server freezes past the ZMTP heartbeat timeout while the game does not poll; when both
    resume, pings are answered again on a new connection, but the reply is gone server-side."""
    process = subprocess.Popen([str(built.api_checks), server.endpoint, "dropped"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None
    try:
        assert read_line(process, 20) == "streaming"
        server.signal(signal.SIGSTOP)
        try:
            time.sleep(1.2)  # past the client's ZMTP heartbeat timeout (3 x 0.2 s): the connection drops
        finally:
            server.signal(signal.SIGCONT)
        process.stdin.write(b"go\n")
        process.stdin.flush()
        code = process.wait(10)
        out = process.stdout.read().decode() if process.stdout else ""
        assert code == 0 and out.endswith("ok\n"), out + (process.stderr.read().decode() if process.stderr else "")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


class HeldReplyServer:
    """A scripted ROUTER: answers pings at once, holds every say until `release()`, then streams one
    token and done. Stands in for a server busy with a long prefill (alive, but silent on the reply)."""

    def __init__(self) -> None:
        import zmq

        self.endpoint = free_tcp_endpoint()
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(self.endpoint)
        self.released = threading.Event()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        held: list[tuple[bytes, str]] = []
        while not self.stopped.is_set():
            if self.socket.poll(20):
                identity, frame = self.socket.recv_multipart()
                request = msgpack.unpackb(frame, raw=False)
                if request["op"] == "say":
                    held.append((identity, request["id"]))
                else:
                    self._send(identity, {"type": "ok", "id": request["id"]})
            if self.released.is_set():
                for identity, request_id in held:
                    self._send(identity, {"type": "token", "id": request_id, "seq": 0, "text": "Hm."})
                    self._send(identity, {"type": "done", "id": request_id, "seq": 1, "text": "Hm.",
                                          "finish_reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": 1},
                                          "timings": {"queue_ms": 0.0, "ttft_ms": 1.0, "total_ms": 1.0}})
                held.clear()

    def _send(self, identity: bytes, message: dict[str, object]) -> None:
        self.socket.send_multipart([identity, msgpack.packb(message)])

    def release(self) -> None:
        self.released.set()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.socket.close(linger=0)
        self.context.term()


def test_a_reply_survives_a_game_stall_while_the_server_is_silent(built: Built) -> None:
    fake = HeldReplyServer()
    process = subprocess.Popen([str(built.api_checks), fake.endpoint, "stall"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None
    try:
        assert read_line(process, 20) == "stalling"
        time.sleep(1.0)  # the game does not poll for 1 s (2.5 x its 0.4 s timeout); the server says nothing
        process.stdin.write(b"go\n")
        process.stdin.flush()
        time.sleep(0.2)  # the client polls again: it must ask (ping) before judging the server silent
        fake.release()
        code = process.wait(10)
        out = process.stdout.read().decode() if process.stdout else ""
        assert code == 0 and out.endswith("ok\n"), out + (process.stderr.read().decode() if process.stderr else "")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        fake.stop()


def test_server_down_gives_unavailable_within_the_timeout(built: Built) -> None:
    timeout_ms, retries = 300, 1
    run = talk(built, "--endpoint", free_tcp_endpoint(), "--timeout-ms", str(timeout_ms), "--retries", str(retries),
               "Anyone there?", timeout=20)
    assert run.code == status_numbers(built)["unavailable"], run.stderr
    assert "gave up on hello after 2 attempts" in run.stderr and "reconnecting" in run.stderr
    limit = (retries + 1) * timeout_ms / 1000
    assert limit <= run.seconds < limit + 2.0, f"took {run.seconds:.2f} s for a {limit:.2f} s limit"


def test_a_server_that_freezes_mid_reply_fails_the_reply_within_the_timeout(built: Built, server: ServerProcess) -> None:
    process = subprocess.Popen([str(built.talk), "--endpoint", server.endpoint, *MIRA, "--player", "c-freeze",
                                "--max-new-tokens", "500", "--timeout-ms", "600", "Talk to me."],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdout.read(1), "no token arrived"
        server.signal(signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            code = process.wait(timeout=15)
        finally:
            server.signal(signal.SIGCONT)
        elapsed = time.monotonic() - frozen
        stderr = process.stderr.read().decode() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Sanitizer" not in stderr
    assert code == status_numbers(built)["unavailable"], stderr
    assert "error: unavailable:" in stderr and "was cut after" in stderr
    assert elapsed < 0.6 + 2.0, f"the frozen server was noticed after {elapsed:.2f} s (timeout 0.6 s)"
    assert server.request("ping")["type"] == "ok"  # the server itself carries on
