"""A real ``npctalk serve`` subprocess for integration tests: start, wait until it answers, tear down.

No sleeps: readiness is a ``ping`` answered on a DEALER socket polled with a timeout, and every
wait has a deadline. ``stop()`` is safe to call twice and always leaves no process behind.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq

# Greedy, no penalties: the tiny random models then never stop early, so streams run to length.
LONG_STREAMS = ("--temperature", "0", "--no-repeat-ngram", "0", "--repetition-penalty", "1.0")
_ids = itertools.count()


def free_tcp_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


class ServerProcess:
    """``python -m npctalk.engine.cli serve --model BUNDLE --bind ENDPOINT *args``."""

    def __init__(self, bundle: Path, workdir: Path, *args: str, endpoint: str | None = None,
                 default_memory_db: bool = False) -> None:
        number = next(_ids)
        # Each test server gets its own memory database (never the user's ~/.cache one) and no embedding
        # model, unless the test asks otherwise; the path stays the same across restarts of this instance.
        if "--memory-db" not in args and not default_memory_db:
            args = (*args, "--memory-db", str(workdir / f"memory-{os.getpid()}-{number}.sqlite3"))
        if "--memory-embeddings" not in args:
            args = (*args, "--memory-embeddings", "off")
        self.bundle, self.workdir, self.args = bundle, workdir, args
        self.endpoint = endpoint or free_tcp_endpoint()
        self.log_path = workdir / f"server-{os.getpid()}-{number}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.context = zmq.Context()
        self._sockets: list[zmq.Socket] = []

    def start(self, timeout: float = 60.0) -> ServerProcess:
        command = [sys.executable, "-m", "npctalk.engine.cli", "serve", "--model", str(self.bundle),
                   "--bind", self.endpoint, "--provider", "cpu", "--threads", "1", *self.args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        probe = self.dealer()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"The server exited with {self.process.returncode} while starting:\n{self.log()}")
            send(probe, op="ping", id="ready?")
            if probe.poll(200):
                if recv(probe)["type"] == "ok":
                    probe.close(linger=0)
                    return self
        self.stop()
        raise RuntimeError(f"The server did not answer ping within {timeout} s:\n{self.log()}")

    def dealer(self, **options: int) -> zmq.Socket:
        """A raw DEALER connected to the server (closed by ``stop``)."""
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name), value)
        sock.connect(self.endpoint)
        self._sockets.append(sock)
        return sock

    def request(self, op: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        """One request on a fresh socket; its single reply."""
        sock = self.dealer()
        try:
            send(sock, op=op, id=f"q{next(_ids)}", **fields)
            return recv(sock, timeout)
        finally:
            sock.close(linger=0)

    def stats(self) -> dict[str, Any]:
        return self.request("stats")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for sock in self._sockets:
            sock.close(linger=0)
        self._sockets.clear()
        self.context.term()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""


def send(sock: zmq.Socket, **message: Any) -> None:
    sock.send(msgpack.packb({"v": 1, **message}, use_bin_type=True))


def recv(sock: zmq.Socket, timeout: float = 5.0) -> dict[str, Any]:
    if not sock.poll(int(timeout * 1000)):
        raise TimeoutError(f"No reply within {timeout} s.")
    return msgpack.unpackb(sock.recv(), raw=False)


def collect(sock: zmq.Socket, request_id: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Every message of one stream up to its terminal one (other ids are skipped)."""
    return collect_all(sock, [request_id], timeout)[request_id]


def collect_all(sock: zmq.Socket, request_ids: list[str], timeout: float = 10.0) -> dict[str, list[dict[str, Any]]]:
    """Every message of several streams, each up to its terminal one (other ids are skipped)."""
    streams: dict[str, list[dict[str, Any]]] = {i: [] for i in request_ids}
    open_ids = set(request_ids)
    deadline = time.monotonic() + timeout
    while open_ids:
        message = recv(sock, max(0.0, deadline - time.monotonic()))
        if message.get("id") in open_ids:
            streams[message["id"]].append(message)
            if message["type"] in ("done", "error"):
                open_ids.discard(message["id"])
    return streams
