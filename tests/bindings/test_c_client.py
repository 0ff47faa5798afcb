"""The C client (bindings/c) built with CMake and run against a real server subprocess.

The `talk` example drives every test: a streamed reply (tokens concatenated == done text, the same
text the Python client gets for the same seeded request), cancel, server error codes, a server that
is down or freezes mid-reply (Lazy Pirate timeouts), and the C++ wrapper. Skipped, with the reason,
where cmake, pkg-config, libzmq or msgpack-c are missing (`.ci/run` installs them).
"""

from __future__ import annotations

import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest

from npctalk.engine.protocol import ErrorCode
from server_process import LONG_STREAMS, ServerProcess, free_tcp_endpoint

SOURCE = Path(__file__).resolve().parents[2] / "bindings" / "c"
MIRA = ("--npc", "mira", "--persona-name", "Mira", "--persona-role", "a herbalist")
DONE_MARKER = "\n--- done ---\n"


def _missing_tools() -> str | None:
    for tool in ("cmake", "pkg-config", "cc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    for modules in (("libzmq",), ("msgpack-c", "msgpack")):
        if not any(subprocess.run(["pkg-config", "--exists", m], check=False).returncode == 0 for m in modules):
            return f"pkg-config finds no {' / '.join(modules)} (install libzmq3-dev and libmsgpack-dev)"
    return None


pytestmark = pytest.mark.skipif(_missing_tools() is not None, reason=f"C client not buildable: {_missing_tools()}")


@dataclass(frozen=True)
class Built:
    talk: Path
    talk_cpp: Path | None
    api_checks: Path


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """bindings/c configured and built once: warnings as errors, ASan + UBSan (a memory error fails the run)."""
    build = tmp_path_factory.mktemp("c-build")
    for command in (["cmake", "-S", str(SOURCE), "-B", str(build), "-DNPCTALK_WERROR=ON", "-DNPCTALK_SANITIZE=ON"],
                    ["cmake", "--build", str(build), "-j", "2"]):
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    # api_checks.c exercises the API directly (callbacks that re-enter, close, recover): built on the library
    msgpack_module = next(m for m in ("msgpack-c", "msgpack")
                          if subprocess.run(["pkg-config", "--exists", m], check=False).returncode == 0)
    libs = subprocess.run(["pkg-config", "--libs", "libzmq", msgpack_module], capture_output=True, text=True,
                          check=True).stdout.split()
    command = ["cc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-fsanitize=address,undefined", "-g",
               f"-I{SOURCE / 'include'}", str(Path(__file__).with_name("api_checks.c")), str(build / "libnpctalk.a"),
               *libs, "-o", str(build / "api_checks")]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr}"
    cpp = build / "talk_cpp"
    return Built(build / "talk", cpp if cpp.exists() else None, build / "api_checks")


@pytest.fixture(scope="module")
def server(gpt2_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(gpt2_bundle, tmp_path_factory.mktemp("server"), *LONG_STREAMS, "--max-new-tokens", "600").start()
    try:
        yield proc
    finally:
        proc.stop()


@dataclass(frozen=True)
class Talked:
    code: int
    stdout: str
    stderr: str
    seconds: float

    def summary(self) -> dict[str, str]:
        """The `done: key=value ...` line talk writes to stderr."""
        line = next(x for x in self.stderr.splitlines() if x.startswith("done: "))
        return dict(pair.split("=", 1) for pair in line[len("done: "):].split())


def talk(built: Built, *args: str, timeout: float = 60.0) -> Talked:
    start = time.monotonic()
    done = subprocess.run([str(built.talk), *args], capture_output=True, check=False, timeout=timeout)
    # decode strictly: the protocol promises no broken UTF-8 in any token
    talked = Talked(done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8"), time.monotonic() - start)
    assert "Sanitizer" not in talked.stderr and "runtime error" not in talked.stderr, talked.stderr
    return talked


def status_numbers(built: Built) -> dict[str, int]:
    listed = talk(built, "--list-status")
    assert listed.code == 0
    return {name: int(number) for number, name in (line.split() for line in listed.stdout.splitlines())}


@pytest.mark.parametrize("check", ["arguments", "concurrent", "reentry", "close"])
def test_api_behaviour(built: Built, server: ServerProcess, check: str) -> None:
    """arguments: bad input fails at once with a sentence. concurrent: four replies on one client.
    reentry: a callback starts a reply; blocking calls and poll from callbacks are refused.
    close: npctalk_close inside a callback is deferred and safe (ASan would catch a use after free)."""
    done = subprocess.run([str(built.api_checks), server.endpoint, check], capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.returncode == 0 and done.stdout.endswith("ok\n"), done.stdout + done.stderr


def _read_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, f"api_checks said nothing for {timeout} s"
    return process.stdout.readline().decode().strip()


def test_the_same_client_recovers_after_the_server_froze(built: Built, server: ServerProcess) -> None:
    process = subprocess.Popen([str(built.api_checks), server.endpoint, "recover"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None
    try:
        assert _read_line(process, 20) == "streaming"
        server.signal(signal.SIGSTOP)
        try:
            assert _read_line(process, 5) == "lost"  # 0.6 s client timeout
        finally:
            server.signal(signal.SIGCONT)
        process.stdin.write(b"go\n")
        process.stdin.flush()
        code = process.wait(30)
        rest = _read_line(process, 1) if code == 0 else process.stdout.read().decode()  # type: ignore[union-attr]
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
        assert _read_line(process, 20) == "streaming"
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
        assert _read_line(process, 20) == "stalling"
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


def test_status_enum_matches_the_protocol_error_codes(built: Built) -> None:
    numbers = status_numbers(built)
    assert numbers["ok"] == 0
    server_codes = [numbers[code.value] for code in ErrorCode]  # KeyError names a code the C API lacks
    assert len(set(server_codes)) == len(server_codes) and 0 not in server_codes
    client_side = set(numbers.values()) - set(server_codes) - {0}
    assert client_side and client_side.isdisjoint(server_codes)


def test_a_streamed_reply_arrives_and_equals_the_done_text(built: Built, server: ServerProcess) -> None:
    run = talk(built, "--endpoint", server.endpoint, *MIRA, "--player", "c-stream", "--max-new-tokens", "40",
               "--context", "location=the garden", "--context", "time_of_day=dusk", "--print-done", "Hello!")
    assert run.code == 0, run.stderr
    streamed, done_text = run.stdout.rsplit(DONE_MARKER, 1)
    assert streamed == done_text.removesuffix("\n") and streamed
    summary = run.summary()
    assert summary["finish_reason"] == "length" and summary["completion_tokens"] == "40"
    assert int(summary["token_messages"]) > 1, "the reply arrived in one piece, not streamed"
    assert "npctalk" in run.stderr.splitlines()[0]  # hello answered before the say


def test_zero_wait_poll_never_blocks_a_game_frame(built: Built, server: ServerProcess) -> None:
    run = talk(built, "--endpoint", server.endpoint, *MIRA, "--player", "c-frames", "--max-new-tokens", "60",
               "--frame-ms", "2", "Hello!")
    assert run.code == 0, run.stderr
    loop = dict(pair.split("=") for pair in next(x for x in run.stderr.splitlines() if x.startswith("game_loop: "))
                .split()[1:])
    # the reply spanned many frames: each poll returned with what had arrived instead of waiting for more
    assert int(loop["polls"]) > 2 and int(run.summary()["token_messages"]) > 1
    assert float(loop["slowest_poll_ms"]) < 50, f"a zero-wait poll took {loop['slowest_poll_ms']} ms"


def test_same_request_same_text_as_the_python_client(built: Built, server: ServerProcess) -> None:
    """Seed, temperature, top-k/p, player and context reach the server exactly as Python sends them."""
    from npctalk.client import Client

    sampling = {"max_new_tokens": 24, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 1234}
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in sampling.items()]
    flags = [part for flag in flags for part in flag.split("=", 1)]
    texts = []
    for player in ("c-seed-1", "c-seed-2"):  # fresh players: no history, identical prompts
        run = talk(built, "--endpoint", server.endpoint, *MIRA, "--player", player, *flags,
                   "--context", "weather=rain", "--print-done", "What do you sell?")
        assert run.code == 0, run.stderr
        texts.append(run.stdout.rsplit(DONE_MARKER, 1)[1].removesuffix("\n"))
    with Client(server.endpoint, timeout=5.0) as client:
        python_text = client.say("mira", "What do you sell?", player="py-seed", context={"weather": "rain"},
                                 **sampling).wait().text
    assert texts[0] == texts[1] == python_text and texts[0]


def test_cancel_ends_the_reply_with_finish_reason_cancelled(built: Built, server: ServerProcess) -> None:
    run = talk(built, "--endpoint", server.endpoint, *MIRA, "--player", "c-cancel", "--max-new-tokens", "500",
               "--cancel-after", "3", "--print-done", "Tell me everything.")
    assert run.code == 0, run.stderr
    summary = run.summary()
    assert summary["finish_reason"] == "cancelled"
    assert 3 <= int(summary["completion_tokens"]) < 500
    streamed, done_text = run.stdout.rsplit(DONE_MARKER, 1)
    assert streamed == done_text.removesuffix("\n")


def test_unknown_npc_exits_with_its_error_code(built: Built, server: ServerProcess) -> None:
    run = talk(built, "--endpoint", server.endpoint, "--npc", "ghost", "Boo?")
    assert run.code == status_numbers(built)["unknown_npc"]
    assert "error: unknown_npc:" in run.stderr and "ghost" in run.stderr


def test_a_server_side_bad_request_reaches_the_caller(built: Built, server: ServerProcess) -> None:
    run = talk(built, "--endpoint", server.endpoint, "--npc", "bram", "--temperature", "9", "Hi")
    assert run.code == status_numbers(built)["bad_request"]
    assert "temperature" in run.stderr


def test_per_request_deadlines_end_a_long_reply_with_timeout(built: Built, server: ServerProcess) -> None:
    """deadline_ms is the server's limit for one say; --reply-timeout-ms the client's own (it cancels)."""
    timeout = status_numbers(built)["timeout"]
    long_reply = ("--endpoint", server.endpoint, *MIRA, "--player", "c-deadline", "--max-new-tokens", "600")
    by_server = talk(built, *long_reply, "--deadline-ms", "30", "Tell me everything.")
    assert by_server.code == timeout and "error: timeout:" in by_server.stderr, by_server.stderr
    by_client = talk(built, *long_reply, "--reply-timeout-ms", "30", "Tell me everything.")
    assert by_client.code == timeout and "did not end within its timeout_ms" in by_client.stderr, by_client.stderr
    assert by_server.seconds < 10 and by_client.seconds < 10


def test_too_large_is_told_by_the_server_or_before_sending(built: Built, server: ServerProcess) -> None:
    too_large = status_numbers(built)["too_large"]
    long_line = talk(built, "--endpoint", server.endpoint, "--npc", "bram", "x" * 5000)  # over 4000 characters
    assert long_line.code == too_large and "4000" in long_line.stderr, long_line.stderr
    huge_frame = talk(built, "--endpoint", server.endpoint, "--npc", "bram", "x" * 70_000)  # the server could not read it
    assert huge_frame.code == too_large and "70" in huge_frame.stderr and "65536" in huge_frame.stderr, huge_frame.stderr
    assert huge_frame.seconds < 5


def test_bad_usage_names_the_flag(built: Built) -> None:
    run = talk(built, "--max-new-tokens", "many", "Hi")
    assert run.code == 64 and "--max-new-tokens" in run.stderr


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


def test_cpp_wrapper_streams_a_reply(built: Built, server: ServerProcess) -> None:
    if built.talk_cpp is None:
        pytest.skip("no C++ compiler: the header-only wrapper example was not built")
    done = subprocess.run([str(built.talk_cpp), server.endpoint, "bram", "Hello there."], capture_output=True,
                          check=False, timeout=60)
    assert done.returncode == 0 and b"Sanitizer" not in done.stderr, done.stderr.decode()
    assert done.stdout.decode("utf-8").strip() and "finish_reason=" in done.stderr.decode()


def test_a_persona_map_from_msgpack_reaches_the_server(built: Built, server: ServerProcess, tmp_path: Path) -> None:
    persona = {"name": "Wren", "role": "a river scout", "scenario": "Spring floods are coming.",
               "lorebook": [{"keys": ["river"], "content": "The river floods every spring."}],
               "traits": ["quiet", "watchful"]}
    (tmp_path / "wren.msgpack").write_bytes(msgpack.packb(persona))
    run = talk(built, "--endpoint", server.endpoint, "--npc", "c-wren", "--persona-msgpack", str(tmp_path / "wren.msgpack"),
               "--max-new-tokens", "8", "How is the river?")
    assert run.code == 0, run.stderr
    assert "created NPC c-wren" in run.stderr
    stored = server.request("npc.get", npc="c-wren")["persona"]
    assert stored["scenario"] == persona["scenario"] and stored["traits"] == persona["traits"]
    assert stored["lorebook"][0]["content"] == persona["lorebook"][0]["content"]

    (tmp_path / "roleless.msgpack").write_bytes(msgpack.packb({"name": "Nobody"}))
    run = talk(built, "--endpoint", server.endpoint, "--npc", "c-nobody", "--persona-msgpack",
               str(tmp_path / "roleless.msgpack"), "Hi")
    assert run.code == status_numbers(built)["bad_request"] and "role" in run.stderr

    (tmp_path / "list.msgpack").write_bytes(msgpack.packb(["not", "a", "map"]))
    run = talk(built, "--endpoint", server.endpoint, "--npc", "c-list", "--persona-msgpack", str(tmp_path / "list.msgpack"),
               "Hi")
    assert run.code == status_numbers(built)["invalid_argument"] and "one msgpack map" in run.stderr


@pytest.fixture(scope="module")
def curve_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """server and alice (allowed) and mallory (not allowed) key pairs, as `npctalk keygen` writes them."""
    from npctalk.engine.security import generate

    root = tmp_path_factory.mktemp("curve-keys")
    generate(root, "server")
    alice, _ = generate(root, "alice")
    generate(root, "mallory")
    (root / "allowed").mkdir()
    (root / "allowed" / "alice.key").write_bytes(alice.read_bytes())
    return root


@pytest.fixture(scope="module")
def curve_endpoint(gpt2_bundle: Path, curve_keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`npctalk serve` with CURVE, admitting only alice. Not ServerProcess: its readiness probe has no
    keys; the first C call waits for readiness itself (hello retried, Lazy Pirate)."""
    endpoint = free_tcp_endpoint()
    log = tmp_path_factory.mktemp("curve-server") / "server.log"
    command = [sys.executable, "-m", "npctalk.engine.cli", "serve", "--model", str(gpt2_bundle), "--bind", endpoint,
               "--provider", "cpu", "--threads", "1", "--curve-secret-key", str(curve_keys / "server.key_secret"),
               "--curve-clients", str(curve_keys / "allowed")]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        yield endpoint
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(15) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_curve_keys_let_an_allowed_client_in_and_keep_others_out(built: Built, curve_endpoint: str,
                                                                 curve_keys: Path) -> None:
    def over_curve(client: str, *args: str) -> Talked:
        return talk(built, "--endpoint", curve_endpoint, "--curve-server-key", str(curve_keys / "server.key"),
                    "--curve-client-secret", str(curve_keys / f"{client}.key_secret"), *args)

    allowed = over_curve("alice", "--timeout-ms", "1000", "--retries", "60", "--max-new-tokens", "12", "--print-done",
                         "Hello over an encrypted line")  # retries: the server may still be loading
    assert allowed.code == 0, allowed.stderr
    streamed, done_text = allowed.stdout.rsplit(DONE_MARKER, 1)
    assert streamed == done_text.removesuffix("\n") and allowed.summary()["completion_tokens"] == "12"

    unavailable = status_numbers(built)["unavailable"]
    refused = over_curve("mallory", "--timeout-ms", "300", "--retries", "0", "Let me in")
    assert refused.code == unavailable, refused.stderr
    plain = talk(built, "--endpoint", curve_endpoint, "--timeout-ms", "300", "--retries", "0", "No keys")
    assert plain.code == unavailable, plain.stderr
    wrong_file = over_curve("alice", "--curve-client-secret", str(curve_keys / "alice.key"), "Hi")
    assert wrong_file.code == status_numbers(built)["invalid_argument"] and "NAME.key_secret" in wrong_file.stderr
