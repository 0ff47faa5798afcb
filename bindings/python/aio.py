"""The asyncio client: the same requests as ``Client``, awaited.

    from npctalk.client import AsyncClient

    async with AsyncClient("tcp://127.0.0.1:5555") as npc:
        reply = await npc.say("elda", "A room for the night?")
        async for text in reply:
            print(text, end="")
        print((await reply.wait()).finish_reason)

One reader task owns the waiting: it awaits the socket, feeds what arrives to the shared
``core.ClientCore`` (through the shared ``connection.Connection``), services heartbeats and
reconnects, and wakes the coroutines waiting for a reply. ``poll()`` returns the events that have
arrived without awaiting anything. Use a client from one event loop only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, cast

import zmq
import zmq.asyncio

from npctalk.engine.protocol import DEFAULT_ENDPOINT, Op
from npctalk.engine.security import CurveClientKeys

from .connection import Connection
from .core import HEARTBEAT_S, RETRIES, TIMEOUT_S, ClientCore, ReplyView
from .errors import ClientError
from .events import Event, SayResult

log = logging.getLogger(__name__)


class AsyncReply(ReplyView):
    """One streaming NPC reply. ``async for`` text chunks; ``await wait()`` for the result."""

    def __init__(self, client: AsyncClient, view: ReplyView) -> None:
        super().__init__(view._core, view._stream)
        self._client = client

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            texts, over = self._take()
            for text in texts:
                yield text
            if over:
                self._outcome()
                return
            await self._client._wait(self._has_news)

    async def wait(self) -> SayResult:
        """The result once the reply ends (raises its error)."""
        async for _ in self:
            pass
        return self._outcome()

    def cancel(self) -> None:
        """Ask the server to stop this reply ("cancelled"); never blocks."""
        if frame := self._cancel_frame():
            self._client._connection.send(frame)


class AsyncClient:
    """A connection to ``npctalk serve`` for asyncio code; arguments as for ``Client``."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, timeout: float = TIMEOUT_S, retries: int = RETRIES,
                 heartbeat: float = HEARTBEAT_S, context: zmq.asyncio.Context | None = None,
                 curve: CurveClientKeys | None = None) -> None:
        self._core = ClientCore(timeout=timeout, retries=retries, heartbeat=heartbeat)
        self._connection = Connection(context or zmq.asyncio.Context.instance(), endpoint, self._core, curve)
        self.endpoint = endpoint
        self._changed: asyncio.Condition | None = None
        self._reader: asyncio.Task[None] | None = None

    async def hello(self) -> dict[str, Any]:
        return await self._call(Op.HELLO)

    async def ping(self) -> float:
        start = time.perf_counter()
        await self._call(Op.PING)
        return time.perf_counter() - start

    async def upsert_npc(self, npc: str, persona: Mapping[str, Any]) -> bool:
        return bool((await self._call(Op.NPC_UPSERT, npc=npc, persona=dict(persona)))["created"])

    async def get_npc(self, npc: str) -> dict[str, Any]:
        return dict((await self._call(Op.NPC_GET, npc=npc))["persona"])

    async def list_npcs(self) -> list[dict[str, Any]]:
        return list((await self._call(Op.NPC_LIST))["npcs"])

    async def stats(self) -> dict[str, Any]:
        return await self._call(Op.STATS)

    async def memory(self, npc: str, player: str = "player") -> dict[str, Any]:
        reply = await self._call(Op.MEMORY_GET, npc=npc, player=player)
        return {k: reply[k] for k in ("turns", "facts", "summary")}

    async def remember(self, npc: str, fact: str, *, player: str = "player") -> dict[str, Any]:
        return dict((await self._call(Op.MEMORY_REMEMBER, npc=npc, player=player, fact=fact))["fact"])

    async def forget(self, npc: str, fact_id: int | None = None, *, player: str = "player") -> int:
        fields = {"fact_id": fact_id} if fact_id is not None else {"all": True}
        return int((await self._call(Op.MEMORY_FORGET, npc=npc, player=player, **fields))["forgotten"])

    async def clear_memory(self, npc: str, player: str | None = None) -> int:
        return int((await self._call(Op.MEMORY_CLEAR, npc=npc, player=player))["cleared"])

    async def export_save(self, *, npc: str | None = None, player: str | None = None) -> bytes:
        return bytes((await self._call(Op.SAVE_EXPORT, npc=npc, player=player))["save"])

    async def import_save(self, save: bytes, mode: str = "replace") -> int:
        return int((await self._call(Op.SAVE_IMPORT, save=bytes(save), mode=mode))["pairs"])

    async def say(self, npc: str, text: str, *, player: str = "player", context: Mapping[str, Any] | None = None,
                  max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, seed: int | None = None, deadline_ms: int | None = None) -> AsyncReply:
        view, frame = self._core.say(npc, text, player=player, context=context, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                     deadline_ms=deadline_ms)
        self._start_reader()
        self._connection.send(frame)
        return AsyncReply(self, view)

    def poll(self) -> list[Event]:
        """Events that have arrived, without awaiting."""
        self._core.check_open()
        return self._core.take_events()

    async def close(self) -> None:
        self._connection.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, op: Op, **fields: Any) -> dict[str, Any]:
        call = self._core.call(op, **fields)
        self._start_reader()
        self._connection.send(call.frame)
        await self._wait(lambda: call.finished)
        return call.result()

    async def _wait(self, ready: Callable[[], bool]) -> None:
        assert self._changed is not None
        async with self._changed:
            await self._changed.wait_for(lambda: ready() or self._core.closed)
        self._core.check_open()

    def _start_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._changed = self._changed or asyncio.Condition()
            self._reader = asyncio.get_running_loop().create_task(self._read(), name=f"npctalk-client {self.endpoint}")

    async def _read(self) -> None:
        """Feed frames to the core, service its clock, wake the waiters; until the client closes."""
        assert self._changed is not None
        try:
            while not self._core.closed:
                sock = cast(zmq.asyncio.Socket, self._connection.socket)  # created from an asyncio context
                if await sock.poll(self._connection.wait_ms()):  # POLLIN
                    self._connection.drain()
                self._connection.service()
                async with self._changed:
                    self._changed.notify_all()
        except (zmq.ZMQError, ClientError) as exc:  # the socket broke: nothing more can be answered
            log.error("The npctalk client's reader stopped: %s", exc)
            self._core.close()
            async with self._changed:
                self._changed.notify_all()
