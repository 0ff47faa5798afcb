"""The memory and save-slot calls of npctalk.client (sync and asyncio) against a real server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from npctalk.client import AsyncClient, BadRequest, Client, TooLarge
from server_process import LONG_STREAMS, ServerProcess

MIRA = {"name": "Mira", "role": "a herbalist"}


@pytest.fixture(scope="module")
def server(gpt2_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("server")
    proc = ServerProcess(gpt2_bundle, workdir, *LONG_STREAMS, "--memory-db", str(workdir / "memory.sqlite3")).start()
    try:
        yield proc
    finally:
        proc.stop()


def test_memory_calls_and_a_save_round_trip(server: ServerProcess) -> None:
    with Client(server.endpoint, timeout=5.0) as client:
        client.upsert_npc("mira", MIRA)
        result = client.say("mira", "Call me Ada. I sold my old boots.", player="ada", max_new_tokens=4).wait()
        memory = client.memory("mira", "ada")
        assert set(memory) == {"turns", "facts", "summary"}
        assert [(t["player"], t["npc"]) for t in memory["turns"]] == [
            ("Call me Ada. I sold my old boots.", result.text.strip())]
        assert [f["text"] for f in memory["facts"]] == ["The player's name is Ada.", "The player sold their old boots."]
        fact = client.remember("mira", "The player owes Mira three coins.", player="ada")
        assert fact["source"] == "game" and fact["text"] in [f["text"] for f in client.memory("mira", "ada")["facts"]]
        assert client.forget("mira", fact["id"], player="ada") == 1
        save = client.export_save(player="ada")
        assert isinstance(save, bytes) and save
        assert client.clear_memory("mira") == 1 and client.memory("mira", "ada")["facts"] == []
        assert client.import_save(save) == 1
        assert [f["text"] for f in client.memory("mira", "ada")["facts"]] == [f["text"] for f in memory["facts"]]
        assert client.forget("mira", player="ada") == 2  # all of them
        with pytest.raises(BadRequest, match="not a blob from save.export"):
            client.import_save(b"junk")
        with pytest.raises(BadRequest, match="'mode'"):
            client.import_save(save, mode="overwrite")
        with pytest.raises(TooLarge, match="300"):
            client.remember("mira", "x" * 301)


def test_async_memory_calls(server: ServerProcess) -> None:
    async def main() -> None:
        async with AsyncClient(server.endpoint, timeout=5.0) as client:
            fact = await client.remember("bram", "The player rescued the smith's dog.", player="kit")
            assert [f["id"] for f in (await client.memory("bram", "kit"))["facts"]] == [fact["id"]]
            save = await client.export_save(npc="bram")
            assert await client.clear_memory("bram", "kit") == 1
            assert await client.import_save(save, mode="merge") == 1
            assert (await client.memory("bram", "kit"))["facts"][0]["text"] == fact["text"]
            assert await client.forget("bram", player="kit") == 1

    asyncio.run(asyncio.wait_for(main(), 30))
