"""Protocol v1: every request shape the server accepts, and every hostile frame it must refuse."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest

from npctalk.engine import protocol
from npctalk.engine.protocol import ErrorCode, Op, ProtocolError, Say


def frame(**fields: Any) -> bytes:
    return msgpack.packb({"v": 1, "id": "r1", **fields}, use_bin_type=True)


def refused(data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        protocol.parse_request(data)
    assert info.value.message.endswith((".", "?")), "error messages are full sentences"
    return info.value


@pytest.mark.parametrize("op", ["hello", "npc.list", "stats"])
def test_ops_without_fields(op: str) -> None:
    request = protocol.parse_request(frame(op=op))
    assert request.id == "r1" and request.op == Op(op) and isinstance(request.params, protocol.Empty)


def test_ping_with_and_without_streams() -> None:
    assert protocol.parse_request(frame(op="ping")).params == protocol.Ping()
    assert protocol.parse_request(frame(op="ping", streams=["r1", "r2"])).params == protocol.Ping(("r1", "r2"))
    for bad in ("r1", [1], [""], ["x" * 65], ["r"] * 257, {"r1": 1}):
        with pytest.raises(ProtocolError) as caught:
            protocol.parse_request(frame(op="ping", streams=bad))
        assert caught.value.code is ErrorCode.BAD_REQUEST
        assert "streams" in caught.value.message or "max_array_len" in caught.value.message  # 257: msgpack's limit


def test_say_with_every_field_and_defaults() -> None:
    full = protocol.parse_request(frame(
        op="say", npc="bram", player="p2", text="Hello?", context={"location": "forge", "hour": 21, "events": ["a", "b"]},
        max_new_tokens=32, temperature=0.5, top_p=0.9, top_k=20, seed=7, deadline_ms=1500,
    ))
    assert full.params == Say(npc="bram", text="Hello?", player="p2",
                              context={"location": "forge", "hour": 21, "events": ["a", "b"]},
                              max_new_tokens=32, temperature=0.5, top_p=0.9, top_k=20, seed=7, deadline_ms=1500)
    minimal = protocol.parse_request(frame(op="say", npc="bram", text="Hi", seed=None))
    assert minimal.params == Say(npc="bram", text="Hi")  # player "player", nil means default


def test_npc_ops_and_cancel() -> None:
    upsert = protocol.parse_request(frame(op="npc.upsert", npc="mira", persona={"name": "Mira", "role": "herbalist"}))
    assert upsert.params == protocol.NpcUpsert("mira", {"name": "Mira", "role": "herbalist"})
    assert protocol.parse_request(frame(op="npc.get", npc="mira")).params == protocol.NpcRef("mira")
    assert protocol.parse_request(frame(op="cancel", target="r0")).params == protocol.Cancel("r0")


@pytest.mark.parametrize("data, code", [
    (b"", ErrorCode.BAD_REQUEST),                                   # empty frame
    (b"\xc1garbage", ErrorCode.BAD_REQUEST),                        # 0xc1 is never valid msgpack
    (b"\x85\xa1v", ErrorCode.BAD_REQUEST),                          # truncated map
    (msgpack.packb([1, 2, 3]), ErrorCode.BAD_REQUEST),              # not a map
    (msgpack.packb("hello"), ErrorCode.BAD_REQUEST),
    (msgpack.packb(None), ErrorCode.BAD_REQUEST),
    (frame(op="ping") + b"\x00", ErrorCode.BAD_REQUEST),            # bytes after the map
    (msgpack.packb({b"id": b"r1", b"op": b"ping", b"v": 1}, use_bin_type=True), ErrorCode.BAD_REQUEST),  # bin keys
    (b"\x81\xa2id\xa2\xff\xfe", ErrorCode.BAD_REQUEST),             # invalid UTF-8 in a str
    (msgpack.packb({"v": 1, "id": "x", "op": "ping", "t": msgpack.ExtType(5, b"xx")}), ErrorCode.BAD_REQUEST),
    (b"\xdd\xff\xff\xff\xff", ErrorCode.BAD_REQUEST),               # array header claiming 4 billion items
    (b"\xdf\xff\xff\xff\xff", ErrorCode.BAD_REQUEST),               # map header claiming 4 billion pairs
])
def test_garbage_is_refused_with_a_code(data: bytes, code: ErrorCode) -> None:
    assert refused(data).code == code


def test_nesting_depth_is_limited() -> None:
    ok_depth = {"a": {"b": {"c": {"d": {"e": "deep enough"}}}}}  # request map + 5 = depth 6
    assert protocol.decode(msgpack.packb({"v": 1, "x": ok_depth}))
    too_deep: Any = "x"
    for _ in range(protocol.MAX_DEPTH):
        too_deep = {"k": too_deep}
    assert "levels deep" in refused(frame(op="ping", extra=too_deep)).message
    # Far deeper than any stack: msgpack's own limit or ours, never a RecursionError.
    assert refused(b"\x91" * 60_000 + b"\xc0").code == ErrorCode.BAD_REQUEST
    assert refused(b"\x81\xa1k" * 20_000 + b"\xc0").code == ErrorCode.BAD_REQUEST


def test_frame_size_limit() -> None:
    big = frame(op="say", npc="bram", text="x" * protocol.MAX_REQUEST_BYTES)
    error = refused(big)
    assert error.code == ErrorCode.TOO_LARGE and str(protocol.MAX_REQUEST_BYTES) in error.message


def test_envelope_errors_keep_the_id_when_readable() -> None:
    assert refused(msgpack.packb({"v": 1, "op": "ping"})).request_id is None
    assert refused(msgpack.packb({"v": 1, "id": "x" * 65, "op": "ping"})).request_id is None
    assert refused(msgpack.packb({"v": 1, "id": 5, "op": "ping"})).code == ErrorCode.BAD_REQUEST
    missing_v = refused(msgpack.packb({"id": "r9", "op": "ping"}))
    assert (missing_v.code, missing_v.request_id) == (ErrorCode.BAD_REQUEST, "r9")
    assert refused(frame(op="ping") .replace(b"\xa1v\x01", b"\xa1v\xc3")).code == ErrorCode.BAD_REQUEST  # v: true
    future = refused(msgpack.packb({"v": 2, "id": "r2", "op": "ping"}))
    assert (future.code, future.request_id) == (ErrorCode.UNSUPPORTED_VERSION, "r2")
    unknown = refused(frame(op="npc.delete"))
    assert unknown.code == ErrorCode.UNKNOWN_OP and "npc.delete" in unknown.message
    assert refused(frame(op=7)).code == ErrorCode.BAD_REQUEST


def test_unknown_fields_are_refused_by_name() -> None:
    error = refused(frame(op="say", npc="bram", text="hi", temprature=0.5))
    assert error.code == ErrorCode.BAD_REQUEST and "temprature" in error.message
    assert refused(frame(op="ping", npc="bram")).code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("fields", [
    {"text": 5}, {"text": ""}, {"text": "   "}, {"text": b"bytes"}, {"npc": ""}, {"npc": 3}, {"npc": "n" * 65},
    {"player": ""}, {"player": None}, {"temperature": -0.1}, {"temperature": math.nan}, {"temperature": math.inf},
    {"temperature": True}, {"temperature": "hot"}, {"temperature": 99.0}, {"top_p": 0}, {"top_p": 1.5},
    {"top_k": -1}, {"top_k": 2.5}, {"seed": -1}, {"seed": 2**64 - 1}, {"max_new_tokens": 0}, {"max_new_tokens": True},
    {"deadline_ms": 0}, {"deadline_ms": 1.5}, {"deadline_ms": "1s"}, {"deadline_ms": 3_600_001},
    {"context": "forge"}, {"context": [1]}, {"context": {"where": {"nested": "map"}}}, {"context": {"list": [1, 2]}},
    {"context": {"x": math.nan}},
])
def test_say_field_types_are_checked(fields: dict[str, Any]) -> None:
    error = refused(frame(op="say", **{"npc": "bram", "text": "hi", **fields}))
    assert error.code == ErrorCode.BAD_REQUEST and error.request_id == "r1"
    assert next(iter(fields)) in error.message  # names the field


def test_say_sizes_are_too_large() -> None:
    assert refused(frame(op="say", npc="b", text="x" * (protocol.MAX_TEXT_CHARS + 1))).code == ErrorCode.TOO_LARGE
    many = {f"k{i}": "v" for i in range(protocol.MAX_CONTEXT_ENTRIES + 1)}
    assert refused(frame(op="say", npc="b", text="x", context=many)).code == ErrorCode.TOO_LARGE
    wordy = {"events": ["y" * 300] * 8}
    assert refused(frame(op="say", npc="b", text="x", context=wordy)).code == ErrorCode.TOO_LARGE


def test_upsert_persona_must_be_a_map() -> None:
    assert refused(frame(op="npc.upsert", npc="m", persona="Mira")).code == ErrorCode.BAD_REQUEST
    assert refused(frame(op="npc.upsert", persona={"name": "M", "role": "r"})).code == ErrorCode.BAD_REQUEST


def test_replies_round_trip_and_match_the_spec() -> None:
    token = protocol.parse_reply(protocol.encode(protocol.token("r1", 0, "Hel")))
    assert token == {"type": "token", "id": "r1", "seq": 0, "text": "Hel"}
    done = protocol.parse_reply(protocol.encode(protocol.done(
        "r1", 3, "Hello", "stop", prompt_tokens=10, completion_tokens=4, queue_ms=1.0, ttft_ms=2.5, total_ms=9.0)))
    assert set(done) == {"type", "id", "seq", "text", "finish_reason", "usage", "timings"}
    assert done["usage"] == {"prompt_tokens": 10, "completion_tokens": 4}
    assert set(done["timings"]) == {"queue_ms", "ttft_ms", "total_ms"}
    error = protocol.parse_reply(protocol.encode(protocol.error(None, ErrorCode.BUSY, "Full.")))
    assert error == {"type": "error", "id": None, "code": "busy", "message": "Full."}
    assert protocol.parse_reply(protocol.encode(protocol.ok("r2", npcs=[])))["npcs"] == []


@pytest.mark.parametrize("reply", [
    {"type": "token", "id": "r", "seq": "0", "text": "x"}, {"type": "token", "id": "r", "text": "x"},
    {"type": "done", "id": "r", "seq": 1, "text": "", "finish_reason": "exploded", "usage": {}, "timings": {}},
    {"type": "surprise", "id": "r"}, {"type": "ok", "id": 5},
])
def test_client_side_reply_validation(reply: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_reply(msgpack.packb(reply))


def test_every_error_code_is_named_in_the_protocol_document() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "bindings" / "PROTOCOL.md").read_text(encoding="utf-8")
    for name in [*(c.value for c in ErrorCode), *(o.value for o in Op), *protocol.FINISH_REASONS]:
        assert f"`{name}`" in doc, f"{name} is missing from PROTOCOL.md"
