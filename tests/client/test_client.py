"""npctalk.client against a real server subprocess: sync, poll, asyncio, typed errors, server death."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from npctalk.client import (
    AsyncClient, BadRequest, Busy, Client, DoneEvent, ServerUnavailable, TokenEvent, TooLarge, UnknownNpc,
)
from server_process import LONG_STREAMS, ServerProcess

MIRA = {"name": "Mira", "role": "a herbalist"}


@pytest.fixture(scope="module")
def server(gpt2_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(gpt2_bundle, tmp_path_factory.mktemp("server"), *LONG_STREAMS, "--max-new-tokens", "960",
                         "--max-batch", "2", "--max-queue", "2").start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.endpoint, timeout=3.0) as c:
        c.upsert_npc("mira", MIRA)
        yield c


def test_say_streams_text_and_ends_with_a_result(client: Client) -> None:
    reply = client.say("mira", "Hello!", player="p-sync", max_new_tokens=40, context={"location": "the garden"})
    chunks = list(reply)
    result = reply.wait()
    assert "".join(chunks) == result.text == reply.text and reply.done
    assert result.finish_reason == "length" and result.usage.completion_tokens == 40 and result.npc == "mira"
    assert 0 <= result.timings.queue_ms <= result.timings.ttft_ms <= result.timings.total_ms  # type: ignore[operator]


def test_poll_never_blocks_and_delivers_both_npcs(client: Client) -> None:
    replies = [client.say(npc, "Hello!", player="p-poll", max_new_tokens=80) for npc in ("mira", "bram")]
    events, slowest = [], 0.0
    deadline = time.monotonic() + 20
    while not all(r.done for r in replies) and time.monotonic() < deadline:
        start = time.perf_counter()
        events += client.poll()  # one game frame
        slowest = max(slowest, time.perf_counter() - start)
    assert all(r.done for r in replies)
    events += client.poll()
    assert slowest < 0.05, f"poll took {slowest * 1000:.1f} ms"
    for r in replies:
        mine = [e for e in events if e.id == r.id]
        assert [type(e) for e in mine] == [TokenEvent] * (len(mine) - 1) + [DoneEvent]
        assert [e.seq for e in mine[:-1]] == sorted(e.seq for e in mine[:-1])
        assert "".join(e.text for e in mine[:-1]) == r.result.text  # type: ignore[union-attr]
        assert list(r) == []  # poll took every event; the iterator just ends
    ids = [e.id for e in events]
    assert sum(1 for x, y in zip(ids, ids[1:]) if x != y) > 2, "the two replies interleaved"


def test_cancel_from_the_client(client: Client) -> None:
    reply = client.say("mira", "Hello!", player="p-cancel", max_new_tokens=900)
    chunks = iter(reply)
    next(chunks)
    reply.cancel()
    result = reply.wait()
    assert result.finish_reason == "cancelled" and result.usage.completion_tokens < 900


def test_typed_errors_and_npc_calls(client: Client) -> None:
    with pytest.raises(UnknownNpc):
        client.say("ghost", "boo").wait()
    with pytest.raises(TooLarge):
        client.say("mira", "x" * 5000).wait()
    with pytest.raises(BadRequest, match="temperature"):
        client.say("mira", "hi", temperature=-1).wait()
    with pytest.raises(BadRequest, match="role"):
        client.upsert_npc("nobody", {"name": "No Role"})
    assert client.get_npc("mira") == MIRA
    assert "mira" in {n["npc"] for n in client.list_npcs()}
    assert client.hello()["protocol"] == 1 and client.ping() < 1.0


def test_busy_when_capacity_is_full(client: Client) -> None:
    replies = [client.say("mira", "Hello!", player=f"p-busy{i}", max_new_tokens=900) for i in range(6)]
    outcomes = []
    for reply in replies:
        try:
            next(iter(reply))
            outcomes.append("streaming")
        except Busy:
            outcomes.append("busy")
    assert outcomes.count("busy") == 2, outcomes  # capacity: max_batch 2 + max_queue 2
    for reply in replies:
        reply.cancel()
    assert client.stats()["busy"] >= 2


def test_async_client(server: ServerProcess) -> None:
    async def main() -> None:
        async with AsyncClient(server.endpoint, timeout=3.0) as npc:
            await npc.upsert_npc("mira", MIRA)
            assert (await npc.hello())["protocol"] == 1
            a = await npc.say("mira", "Hello!", player="p-async", max_new_tokens=30)
            b = await npc.say("bram", "Hello!", player="p-async", max_new_tokens=20)
            chunks = [text async for text in a]
            results = await asyncio.gather(a.wait(), b.wait())
            assert "".join(chunks) == results[0].text and [r.usage.completion_tokens for r in results] == [30, 20]
            assert npc.poll() == []  # iteration and wait() took every event
            c = await npc.say("elda", "Hello!", player="p-async", max_new_tokens=10)
            events = []
            while not c.done:  # a game loop: one poll per frame, the reader task fills the inbox meanwhile
                await asyncio.sleep(0.005)
                events += npc.poll()
            assert isinstance(events[-1], DoneEvent) and events[-1].result.text == c.text
            assert all(isinstance(e, TokenEvent) for e in events[:-1])
            with pytest.raises(UnknownNpc):
                await (await npc.say("ghost", "boo")).wait()
            assert (await npc.stats())["active"] == 0

    asyncio.run(asyncio.wait_for(main(), 30))


def test_kill9_mid_stream_reports_an_error_within_the_timeout_then_recovers(gpt2_bundle: Path, tmp_path: Path) -> None:
    proc = ServerProcess(gpt2_bundle, tmp_path, *LONG_STREAMS, "--max-new-tokens", "960").start()
    restarted = None
    try:
        with Client(proc.endpoint, timeout=1.0, retries=1, heartbeat=0.25) as client:
            client.upsert_npc("mira", MIRA)
            reply = client.say("mira", "Hello!", max_new_tokens=900)
            chunks = iter(reply)
            next(chunks)
            proc.signal(signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(ServerUnavailable, match="cut after"):
                for _ in chunks:
                    pass
            assert time.monotonic() - killed < 1.0 + 1.0, "the error came within the timeout (plus slack)"
            start = time.monotonic()
            with pytest.raises(ServerUnavailable, match="2 attempts"):
                client.ping()
            assert time.monotonic() - start < 2 * 1.0 + 1.0
            # A server back on the same endpoint: the next request reconnects and succeeds.
            restarted = ServerProcess(gpt2_bundle, tmp_path, endpoint=proc.endpoint).start()
            assert client.ping() < 1.0
    finally:
        proc.stop()
        if restarted is not None:
            restarted.stop()


def test_a_server_restarted_under_a_waiting_reply_fails_it_at_once_not_after_the_timeout(
        gpt2_bundle: Path, tmp_path: Path) -> None:
    proc = ServerProcess(gpt2_bundle, tmp_path, *LONG_STREAMS, "--max-new-tokens", "960").start()
    restarted = None
    try:
        # A timeout far longer than a restart: silence alone would keep this reply waiting for 60 s.
        with Client(proc.endpoint, timeout=60.0, retries=1, heartbeat=0.25) as client:
            client.upsert_npc("mira", MIRA)
            reply = client.say("mira", "Hello!", max_new_tokens=900)
            chunks = iter(reply)
            next(chunks)
            proc.signal(signal.SIGKILL)
            proc.wait(timeout=10)
            restarted = ServerProcess(gpt2_bundle, tmp_path, endpoint=proc.endpoint).start()
            back = time.monotonic()
            with pytest.raises(ServerUnavailable, match="no longer has reply"):
                for _ in chunks:
                    pass
            assert time.monotonic() - back < 5.0, "the lost reply failed at the first answered heartbeat"
            client.upsert_npc("mira", MIRA)  # the new server has no upserted NPCs; the same client goes on
            assert client.say("mira", "Again?", max_new_tokens=4).wait().usage.completion_tokens >= 1
    finally:
        proc.stop()
        if restarted is not None:
            restarted.stop()
