"""ChatSession: streamed turns, persona prefix reuse, history trimming; the terminal chat command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from npctalk.engine.chat import ChatSession
from npctalk.engine.dialogue import Turn
from npctalk.engine.errors import PromptError
from npctalk.engine.model import Model
from npctalk.engine.persona import find_persona
from npctalk.engine.sampling import SearchOptions

GREEDY = SearchOptions(max_new_tokens=12, do_sample=False)


def test_streamed_turns_land_in_history(model: Model) -> None:
    session = ChatSession(model, find_persona("bram"), GREEDY)
    for line in ("Hello there!", "What do you sell? 東京 🐉"):
        chunks = list(session.say(line))
        assert "\ufffd" not in "".join(chunks)
        assert session.history[-2] == Turn("user", line)
        assert session.history[-1] == Turn("assistant", "".join(chunks).strip())
        assert session.finish_reason in ("stop", "length")
    assert len(session.history) == 4


def test_prefix_reuse_equals_a_fresh_prefill(model: Model) -> None:
    """Turn 2 after rewinding to the persona prefix == turn 2 of a session that never saw turn 1 run."""
    persona = find_persona("elda")
    reused = ChatSession(model, persona, GREEDY)
    "".join(reused.say("Good evening."))
    second = "".join(reused.say("Any news today?"))

    fresh = ChatSession(model, persona, GREEDY)
    fresh.history = list(reused.history[:2])
    assert "".join(fresh.say("Any news today?")) == second


def test_same_seed_same_conversation(llama_model: Model) -> None:
    options = SearchOptions(max_new_tokens=16, do_sample=True, temperature=1.0, seed=7)
    replies = ["".join(ChatSession(llama_model, find_persona("tobin"), options).say("Halt yourself!")) for _ in range(2)]
    assert replies[0] == replies[1]


def test_long_history_is_trimmed_oldest_first(llama_model: Model) -> None:
    session = ChatSession(llama_model, find_persona("bram"), GREEDY)
    filler = "The baker's daughter went missing near the old mill. " * 20
    session.history = [Turn("user" if i % 2 == 0 else "assistant", f"{i} {filler}") for i in range(40)]
    reply = "".join(session.say("And what now?"))
    assert session.history[-1].text == reply.strip()
    with pytest.raises(PromptError, match="at most"):
        list(session.say(filler * 20))


def _chat_cli(bundle: Path | str, stdin: str, *extra: str, env_home: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "npctalk.engine.cli", "chat", "--model", str(bundle), "--temperature", "0",
           "--max-new-tokens", "8", *extra]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)


def test_terminal_chat_streams_replies(llama_bundle: Path) -> None:
    out = _chat_cli(llama_bundle, "Hello!\n\nWho are you?\n/quit\nnever read\n", "--npc", "bram")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Bram: Mind the sparks, friend. What do you need forged?\n")
    assert out.stdout.count("\nBram: ") == 2  # two replies; the blank line and what follows /quit are skipped


def test_terminal_chat_explains_a_missing_bundle(tmp_path: Path) -> None:
    out = _chat_cli(tmp_path / "nowhere", "hi\n", "--npc", "bram")
    assert out.returncode == 1
    assert "export-onnx default" in out.stderr and "Traceback" not in out.stderr


def test_terminal_chat_unknown_npc(llama_bundle: Path) -> None:
    out = _chat_cli(llama_bundle, "hi\n", "--npc", "gandalf")
    assert out.returncode == 1 and "No persona named 'gandalf'" in out.stderr
