"""Handlers, prompts and dialogue memory in-process (no sockets): what the server does with a request."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from npctalk.engine.dialogue import Turn
from npctalk.engine.errors import PromptError
from npctalk.engine.handlers import Handlers
from npctalk.engine.model import Model
from npctalk.engine.npcs import NpcRegistry, PromptBuilder, render_context
from npctalk.engine.persona import Persona
from npctalk.engine.scheduler import Scheduler, SchedulerConfig
from npctalk.engine.server import ServerConfig
from npctalk.engine.store import MemoryStore

MIRA = Persona(name="Mira", role="the herbalist of Ashford", traits=("kind",))


def frame(**fields: Any) -> list[bytes]:
    return [msgpack.packb({"v": 1, **fields}, use_bin_type=True)]


@pytest.fixture
def handlers(gpt2_model: Model) -> Handlers:
    scheduler = Scheduler(gpt2_model, SchedulerConfig(max_batch=2, max_queue=1))
    return Handlers(gpt2_model, scheduler, ServerConfig(), NpcRegistry({"mira": MIRA}), MemoryStore())


def test_render_context() -> None:
    line = render_context({"location": "the forge", "time_of_day": "evening", "armed": True,
                           "recent_events": ["the mill burned", "a wolf"], "empty": ""})
    assert line == ("Right now: location: the forge; time of day: evening; armed: yes; "
                    "recent events: the mill burned, a wolf.")
    assert render_context({}) == ""


def test_context_goes_into_the_system_prompt_or_a_leading_turn(llama_model: Model, gpt2_model: Model) -> None:
    context = {"location": "the old mill"}
    chat = PromptBuilder(llama_model.manifest, llama_model.tokenizer)
    text = llama_model.tokenizer.decode(chat.build(MIRA, [], "Hi", context, 16), skip_special_tokens=False)
    assert "herbalist" in text and "Right now: location: the old mill." in text
    assert text.index("Right now") < text.index("<|im_end|>")  # inside the system message
    assert text.endswith("<|im_start|>assistant\n")
    eos = PromptBuilder(gpt2_model.manifest, gpt2_model.tokenizer)
    text = gpt2_model.tokenizer.decode(eos.build(MIRA, [], "Hi", context, 16), skip_special_tokens=False)
    assert "What is going on around here?<|endoftext|>Right now: location: the old mill.<|endoftext|>Hi<|endoftext|>" in text


def test_history_is_trimmed_oldest_first_and_the_line_must_fit(gpt2_model: Model) -> None:
    builder = PromptBuilder(gpt2_model.manifest, gpt2_model.tokenizer)
    history = [Turn("user" if i % 2 == 0 else "assistant", f"turn {i} " + "words " * 30) for i in range(40)]
    ids = builder.build(MIRA, history, "Newest line", {}, 200)
    assert len(ids) + 200 <= gpt2_model.manifest.max_context
    text = gpt2_model.tokenizer.decode(ids)
    assert "turn 39" in text and "turn 0 " not in text and text.endswith("Newest line")
    kept = [i for i in range(40) if f"turn {i} " in text]
    assert kept == list(range(kept[0], 40)) and kept[0] % 2 == 0, "a contiguous tail that opens with a player line"
    with pytest.raises(PromptError, match="context holds"):
        builder.build(MIRA, [], "long " * 900, {}, 200)


def test_a_failing_handler_answers_internal_and_never_raises(handlers: Handlers, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(npc: str) -> Persona:
        raise RuntimeError("bug")

    monkeypatch.setattr(handlers.registry, "get", explode)
    reply = handlers.handle(b"c", frame(id="s", op="say", npc="mira", text="Hi"))
    assert reply is not None and (reply["code"], reply["id"], reply["seq"]) == ("internal", "s", 0)
    assert handlers.handle(b"c", frame(id="g", op="npc.get", npc="mira"))["code"] == "internal"  # type: ignore[index]
    assert handlers.counters["internal_errors"] == 2


def test_say_ids_busy_and_shutdown(handlers: Handlers) -> None:
    assert handlers.handle(b"c", frame(id="a", op="say", npc="mira", text="Hi")) is None  # accepted: streams later
    again = handlers.handle(b"c", frame(id="a", op="say", npc="mira", text="Hi"))
    assert again is not None and again["code"] == "bad_request" and "still streaming" in again["message"]
    assert handlers.handle(b"other", frame(id="a", op="say", npc="mira", text="Hi")) is None  # ids are per client
    assert handlers.handle(b"c", frame(id="b", op="say", npc="mira", text="Hi")) is None
    full = handlers.handle(b"c", frame(id="c", op="say", npc="mira", text="Hi"))
    assert full is not None and full["code"] == "busy"  # max_batch 2 + max_queue 1
    handlers.accepting = False
    closing = handlers.handle(b"d", frame(id="z", op="say", npc="mira", text="Hi"))
    assert closing is not None and closing["code"] == "busy" and "shutting down" in closing["message"]
    assert handlers.handle(b"d", frame(id="p", op="ping")) == {"type": "ok", "id": "p"}


def test_a_says_deadline_ms_ends_it_with_timeout_and_the_server_limit_caps_it(gpt2_model: Model) -> None:
    now = [100.0]
    clock = lambda: now[0]  # noqa: E731 - a test clock the handlers and scheduler share
    scheduler = Scheduler(gpt2_model, SchedulerConfig(max_batch=4, max_queue=4), clock=clock)
    handlers = Handlers(gpt2_model, scheduler, ServerConfig(request_timeout_s=5.0), NpcRegistry({"mira": MIRA}),
                        MemoryStore(), clock=clock)
    for rid, deadline_ms in (("short", 250), ("capped", 60_000), ("default", None)):
        fields = {"deadline_ms": deadline_ms} if deadline_ms else {}
        assert handlers.handle(b"c", frame(id=rid, op="say", npc="mira", text="Hi", max_new_tokens=200, **fields)) is None
    deadlines = {key.id: request.deadline for key, request in scheduler._live.items()}
    assert deadlines == {"short": 100.25, "capped": 105.0, "default": 105.0}
    handlers.scheduler.step()
    now[0] = 100.3  # past the short one's deadline only
    ended = [handlers.message_for(e) for e in scheduler.step()]
    timeouts = [m for m in ended if m["type"] == "error"]
    assert [(m["id"], m["code"]) for m in timeouts] == [("short", "timeout")]
    assert scheduler.has_live(next(k for k in scheduler._live if k.id == "capped"))


def test_finished_replies_are_remembered_cancelled_ones_are_not(handlers: Handlers) -> None:
    handlers.handle(b"c", frame(id="a", op="say", npc="mira", player="p", text="First", max_new_tokens=8,
                                temperature=0))  # greedy: a fixed, non-empty reply
    handlers.handle(b"c", frame(id="b", op="say", npc="mira", player="q", text="Second", max_new_tokens=50))
    messages = []
    handlers.scheduler.step()
    handlers.scheduler.cancel(next(k for k in handlers.scheduler._live if k.id == "b"))
    while handlers.scheduler.has_work:
        messages += [handlers.message_for(e) for e in handlers.scheduler.step()]
    assert {m["finish_reason"] for m in messages if m["type"] == "done"} == {"length", "cancelled"}
    assert [t.line for t in handlers.memory.turns("mira", "p")] == ["First"]
    assert handlers.memory.turns("mira", "q") == []


def test_upsert_replaces_and_keeps_memories(handlers: Handlers) -> None:
    handlers.memory.record("mira", "p", "My name is Ada.", "hello")
    same = handlers.handle(b"c", frame(id="u1", op="npc.upsert", npc="mira",
                                       persona={"name": "Mira", "role": "the herbalist of Ashford", "traits": ["kind"]}))
    assert same == {"type": "ok", "id": "u1", "npc": "mira", "created": False}
    changed = handlers.handle(b"c", frame(id="u2", op="npc.upsert", npc="mira", persona={"name": "Mira", "role": "a witch"}))
    assert changed is not None and changed["created"] is False and handlers.registry.get("mira").role == "a witch"
    # Memories outlive restarts and persona tweaks; memory.clear is how a game starts an NPC over.
    assert [t.line for t in handlers.memory.turns("mira", "p")] == ["My name is Ada."]
    assert [f.text for f in handlers.memory.facts("mira", "p")] == ["The player's name is Ada."]


def test_an_upsert_the_disk_refuses_changes_nothing(handlers: Handlers, monkeypatch: pytest.MonkeyPatch) -> None:
    from npctalk.engine.errors import StoreError

    def refuse(npc: str, persona: Any) -> None:
        raise StoreError("disk full")

    monkeypatch.setattr(handlers.memory, "save_npc", refuse)
    for npc, persona in (("mira", {"name": "Mira", "role": "a witch"}), ("hesk", {"name": "Hesk", "role": "a guard"})):
        reply = handlers.handle(b"c", frame(id=f"u-{npc}", op="npc.upsert", npc=npc, persona=persona))
        assert reply is not None and (reply["type"], reply["code"]) == ("error", "internal")
    assert handlers.registry.get("mira") == MIRA and handlers.registry.get("hesk") is None


def test_saved_personas_come_back_and_a_bad_one_is_skipped(gpt2_model: Model) -> None:
    memory = MemoryStore()
    memory.save_npc("hesk", {"name": "Hesk", "role": "a gate guard"})
    memory.save_npc("broken", {"name": "", "role": "nobody"})           # no longer a valid persona
    scheduler = Scheduler(gpt2_model, SchedulerConfig())
    restored = Handlers(gpt2_model, scheduler, ServerConfig(), NpcRegistry({"mira": MIRA}), memory)
    assert restored.registry.get("hesk") == Persona(name="Hesk", role="a gate guard")
    assert restored.registry.get("broken") is None and restored.registry.get("mira") == MIRA


def test_delivery_keeps_seq_and_one_terminal_when_a_client_stops_reading() -> None:
    from npctalk.engine import protocol
    from npctalk.engine.delivery import Delivery, SendResult
    from npctalk.engine.request import RequestKey

    room = {"free": 2}
    got: list[dict[str, Any]] = []

    def send(client: bytes, message: dict[str, Any]) -> SendResult:
        if room["free"] <= 0:
            return SendResult.FULL
        room["free"] -= 1
        got.append(message)
        return SendResult.SENT

    delivery = Delivery(send, give_up_s=5.0)
    key = RequestKey(b"c", "r")
    results = [delivery.stream(key, protocol.token("r", seq, t), now=0.0) for seq, t in enumerate(["a", "b", "c", "d"])]
    assert results == [SendResult.SENT, SendResult.SENT, SendResult.FULL, SendResult.SENT]  # d: dropped on purpose
    done = protocol.done("r", 4, "abcd", "length", prompt_tokens=1, completion_tokens=4, queue_ms=0, ttft_ms=0, total_ms=1)
    assert delivery.stream(key, done, now=1.0) is SendResult.FULL and delivery.waiting == 1
    delivery.retry(now=2.0)
    assert delivery.waiting == 1  # still no room
    room["free"] = 10
    delivery.retry(now=3.0)
    assert delivery.waiting == 0
    assert [(m["type"], m["seq"]) for m in got] == [("token", 0), ("token", 1), ("done", 2)]
    assert got[-1]["text"] == "ab" and got[-1]["finish_reason"] == "cancelled"
    # A client that never reads again: its waiting terminal message is forgotten after give_up_s.
    room["free"] = 0
    other = RequestKey(b"d", "s")
    delivery.stream(other, protocol.error("s", protocol.ErrorCode.TIMEOUT, "Late.", seq=0), now=10.0)
    delivery.retry(now=16.0)
    assert delivery.waiting == 0


def test_registry_preloads_builtins_and_a_personas_folder(tmp_path: Any) -> None:
    (tmp_path / "Mira.toml").write_text('name = "Mira"\nrole = "the herbalist"\n', encoding="utf-8")
    registry = NpcRegistry.with_builtins(tmp_path)
    assert {"bram", "elda", "tobin", "mira"} <= {npc for npc, _ in registry.items()}
    assert registry.get("mira") == Persona(name="Mira", role="the herbalist")
    with pytest.raises(PromptError, match="does not exist"):
        NpcRegistry.with_builtins(tmp_path / "missing")
    full = NpcRegistry({"a": MIRA}, max_npcs=1)
    assert full.upsert("a", MIRA) is False
    with pytest.raises(PromptError, match="already holds 1 NPCs"):
        full.upsert("b", MIRA)
