"""The C client (bindings/c) built with CMake and run against a real server subprocess.

The `talk` example drives these tests: a streamed reply (tokens concatenated == done text, the same
text the Python client gets for the same seeded request), cancel, server error codes, deadlines,
size limits, persona maps, CURVE, and the C++ wrapper. Skipped, with the reason, where cmake,
pkg-config, libzmq or msgpack-c are missing (`.ci/run` installs them).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from c_harness import BUILDABLE, DONE_MARKER, MIRA, Built, Talked, status_numbers, talk
from npctalk.engine.protocol import ErrorCode
from server_process import ServerProcess, free_tcp_endpoint

pytestmark = BUILDABLE


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
def curve_endpoint(gpt2_bundle: Path, curve_keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`npctalk serve` with CURVE, admitting only alice. Not ServerProcess: its readiness probe has no
    keys; the first C call waits for readiness itself (hello retried, Lazy Pirate)."""
    endpoint = free_tcp_endpoint()
    log = tmp_path_factory.mktemp("curve-server") / "server.log"
    command = [sys.executable, "-m", "npctalk.engine.cli", "serve", "--model", str(gpt2_bundle), "--bind", endpoint,
               "--provider", "cpu", "--threads", "1", "--curve-secret-key", str(curve_keys / "server.key_secret"),
               "--curve-clients", str(curve_keys / "allowed"), "--memory-db", str(log.with_name("memory.sqlite3"))]
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
    wrong_server = talk(built, "--endpoint", curve_endpoint, "--curve-server-key", str(curve_keys / "mallory.key"),
                        "--curve-client-secret", str(curve_keys / "alice.key_secret"), "--timeout-ms", "300",
                        "--retries", "0", "Who are you?")
    assert wrong_server.code == unavailable, wrong_server.stderr
    for run in (refused, plain, wrong_server):  # told why, and quickly: the handshake failure is reported
        assert "refused the connection's handshake (check the CURVE keys" in run.stderr and run.seconds < 3, run.stderr
    wrong_file = over_curve("alice", "--curve-client-secret", str(curve_keys / "alice.key"), "Hi")
    assert wrong_file.code == status_numbers(built)["invalid_argument"] and "NAME.key_secret" in wrong_file.stderr
