"""ClientCore without sockets: reply matching, seq checks, events delivered once, heartbeats, Lazy Pirate."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from npctalk.client import errors
from npctalk.client.core import ClientCore
from npctalk.client.events import DoneEvent, ErrorEvent, TokenEvent
from npctalk.engine import protocol
from npctalk.engine.protocol import ErrorCode, Op


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def core(clock: Clock) -> ClientCore:
    return ClientCore(timeout=3.0, retries=2, heartbeat=1.0, clock=clock)


def sent(frame: bytes) -> dict[str, Any]:
    """A request frame as the server would parse it (so the core only builds valid requests)."""
    request = protocol.parse_request(frame)
    return {"id": request.id, "op": request.op, "params": request.params}


def reply(message: dict[str, Any]) -> bytes:
    return protocol.encode(message)


def test_say_frames_are_valid_requests_and_leave_out_defaults(core: ClientCore) -> None:
    view, frame = core.say("bram", "Hi", player="p", context={"location": "forge"}, seed=None, max_new_tokens=8)
    request = sent(frame)
    assert request["op"] is Op.SAY and request["id"] == view.id
    assert request["params"] == protocol.Say("bram", "Hi", player="p", context={"location": "forge"}, max_new_tokens=8)
    call = core.call(Op.NPC_GET, npc="bram")
    assert sent(call.frame)["params"] == protocol.NpcRef("bram") and call.id != view.id


def test_a_stream_assembles_tokens_and_result(core: ClientCore) -> None:
    view, _ = core.say("bram", "Hi")
    core.feed(reply(protocol.token(view.id, 0, "Mind ")))
    core.feed(reply(protocol.token(view.id, 1, "the sparks.")))
    core.feed(reply(protocol.done(view.id, 2, "Mind the sparks.", "stop", prompt_tokens=9, completion_tokens=5,
                                  queue_ms=1.0, ttft_ms=3.0, total_ms=20.0)))
    assert view.done and view.text == "Mind the sparks." and view.result is not None
    assert (view.result.finish_reason, view.result.usage.completion_tokens, view.result.timings.ttft_ms) == ("stop", 5, 3.0)
    events = core.take_events()
    assert [type(e) for e in events] == [TokenEvent, TokenEvent, DoneEvent]
    assert core.take_events() == [] and not core.pending


def test_events_are_delivered_once_to_poll_or_to_the_reply(core: ClientCore) -> None:
    a, _ = core.say("bram", "Hi")
    b, _ = core.say("elda", "Hi")
    core.feed(reply(protocol.token(a.id, 0, "A0")))
    core.feed(reply(protocol.token(b.id, 0, "B0")))
    core.feed(reply(protocol.token(a.id, 1, "A1")))
    assert a._take() == (["A0", "A1"], False)  # the reply's own iterator took a's events
    assert [(e.id, e.text) for e in core.take_events()] == [(b.id, "B0")]  # poll gets only what is left
    core.feed(reply(protocol.token(b.id, 1, "B1")))
    assert [e.text for e in core.take_events()] == ["B1"] and b._take() == ([], False)


def test_a_seq_gap_fails_the_stream_and_cancels_it_on_the_server(core: ClientCore) -> None:
    view, _ = core.say("bram", "Hi")
    core.feed(reply(protocol.token(view.id, 0, "a")))
    core.feed(reply(protocol.token(view.id, 2, "c")))
    assert isinstance(view.error, errors.ProtocolViolation) and "seq 1 to 2" in str(view.error)
    cancel = [sent(f) for f in core.tick().frames]
    assert cancel == [{"id": cancel[0]["id"], "op": Op.CANCEL, "params": protocol.Cancel(view.id)}]
    core.feed(reply(protocol.token(view.id, 3, "d")))  # late messages of a failed stream are ignored
    assert [type(e) for e in core.take_events()] == [TokenEvent, ErrorEvent]


def test_done_text_must_match_the_tokens(core: ClientCore) -> None:
    view, _ = core.say("bram", "Hi")
    core.feed(reply(protocol.token(view.id, 0, "Hello")))
    core.feed(reply(protocol.done(view.id, 1, "Goodbye", "stop", prompt_tokens=1, completion_tokens=1, queue_ms=0,
                                  ttft_ms=0, total_ms=0)))
    assert isinstance(view.error, errors.ProtocolViolation)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_has_its_exception(core: ClientCore, code: ErrorCode) -> None:
    call = core.call(Op.PING)
    core.feed(reply(protocol.error(call.id, code, "Because.")))
    with pytest.raises(errors.ServerError) as info:
        call.result()
    assert info.value.code == code.value and info.value.request_id == call.id
    assert type(info.value) is errors.ERRORS_BY_CODE[code.value]
    view, _ = core.say("bram", "Hi")
    core.feed(reply(protocol.error(view.id, code, "Because.", seq=0)))
    assert type(view.error) is errors.ERRORS_BY_CODE[code.value]


def test_unreadable_and_unmatched_frames_are_ignored(core: ClientCore) -> None:
    call = core.call(Op.PING)
    core.feed(b"\xc1 not msgpack")
    core.feed(msgpack.packb({"type": "ok", "id": "someone-else"}))
    core.feed(reply(protocol.error(None, ErrorCode.BAD_REQUEST, "What?")))
    assert not call.finished and core.pending
    core.feed(reply(protocol.ok(call.id)))
    assert call.result() == {}


def test_heartbeats_while_pending_and_silence_when_idle(core: ClientCore, clock: Clock) -> None:
    assert core.next_wakeup() is None and core.tick().frames == []
    clock.now += 60  # a long idle time must not count as server silence
    view, _ = core.say("bram", "Hi")
    core.sent()
    assert core.tick().frames == [] and core.next_wakeup() == pytest.approx(1.0)
    clock.now += 1.0
    ping = [sent(f) for f in core.tick().frames]
    assert [p["op"] for p in ping] == [Op.PING]
    core.sent()
    core.feed(reply(protocol.ok(ping[0]["id"])))  # a pong is a sign of life, not an event
    assert core.take_events() == [] and not view.done and not core.tick().reconnect


def test_pings_list_waited_streams_and_unknown_ones_fail_at_once(core: ClientCore, clock: Clock) -> None:
    lost, kept, ended = (core.say("bram", text)[0] for text in ("a", "b", "c"))
    core.feed(reply(protocol.token(lost.id, 0, "Mi")))
    core.feed(reply(protocol.done(ended.id, 0, "", "stop", prompt_tokens=1, completion_tokens=1,
                                  queue_ms=0.0, ttft_ms=None, total_ms=1.0)))
    core.sent()
    clock.now += 1.0
    [ping] = [sent(f) for f in core.tick().frames]
    assert ping["op"] is Op.PING and ping["params"] == protocol.Ping((lost.id, kept.id))  # the ended one is not asked
    core.sent()
    core.feed(reply(protocol.ok(ping["id"], unknown=[lost.id, ended.id, "never-mine"])))
    assert isinstance(lost.error, errors.ServerUnavailable) and "no longer has reply" in str(lost.error)
    assert kept.error is None and not kept.done and ended.result is not None and ended.error is None
    assert not core.tick().reconnect  # the server is alive: only the lost reply failed
    assert [sent(f)["op"] for f in core.tick().frames] == []  # no cancel for a stream the server does not have


def test_lazy_pirate_resends_calls_and_fails_streams(core: ClientCore, clock: Clock) -> None:
    call = core.call(Op.STATS)
    view, _ = core.say("bram", "Hi")
    core.feed(reply(protocol.token(view.id, 0, "Mind")))
    clock.now += 3.5  # silence past the timeout
    assert core.tick().reconnect
    resent = core.reconnected()
    assert [sent(f)["id"] for f in resent] == [call.id]  # same id: the answer is matched however late
    assert isinstance(view.error, errors.ServerUnavailable) and "cut after 1 chunks" in str(view.error)
    for _ in range(2):
        clock.now += 3.5
        assert core.tick().reconnect
        resent = core.reconnected()
    assert resent == [] and isinstance(call.error, errors.ServerUnavailable) and "3 attempts" in str(call.error)
    assert not core.pending


def test_close_fails_pending_work(core: ClientCore) -> None:
    call = core.call(Op.PING)
    view, _ = core.say("bram", "Hi")
    core.close()
    assert isinstance(call.error, errors.ClientClosed) and isinstance(view.error, errors.ClientClosed)
    with pytest.raises(errors.ClientClosed):
        core.call(Op.PING)
