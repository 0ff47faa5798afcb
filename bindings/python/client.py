"""The blocking client, for scripts and for game loops (``poll()`` never blocks a frame).

    from npctalk.client import Client

    with Client("tcp://127.0.0.1:5555") as npc:
        reply = npc.say("bram", "Got any iron?", context={"location": "the forge"})
        for text in reply:                      # blocks until each chunk arrives
            print(text, end="", flush=True)
        print(reply.result.finish_reason)

    # In a game loop instead: start replies, then once per frame
    for event in npc.poll():                   # zero timeout: only what has arrived
        ...                                    # TokenEvent / DoneEvent / ErrorEvent

Protocol state lives in ``core.ClientCore`` and socket handling in ``connection.Connection``, both
shared with ``AsyncClient``; this module only decides how to wait (block on ``poll``). Not
thread-safe: use one client per thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import zmq

from npctalk.engine.protocol import DEFAULT_ENDPOINT, Op
from npctalk.engine.security import CurveClientKeys

from .connection import Connection
from .core import HEARTBEAT_S, RETRIES, TIMEOUT_S, ClientCore, ReplyView
from .events import Event, SayResult


_MEMORY_FIELDS = ("turns", "facts", "summary")


class Reply(ReplyView):
    """One streaming NPC reply. Iterate for text chunks; ``wait()`` or ``result`` once it has ended."""

    def __init__(self, client: Client, view: ReplyView) -> None:
        super().__init__(view._core, view._stream)
        self._client = client

    def __iter__(self) -> Iterator[str]:
        """Text chunks as they arrive (those not already taken by ``poll``); raises the reply's error."""
        while True:
            texts, over = self._take()
            yield from texts
            if over:
                self._outcome()
                return
            self._client._wait(self._has_news)

    def wait(self) -> SayResult:
        """Block until the reply ends; its result (raises its error)."""
        for _ in self:
            pass
        return self._outcome()

    def cancel(self) -> None:
        """Ask the server to stop this reply; it then ends with finish_reason "cancelled". Never blocks."""
        if frame := self._cancel_frame():
            self._client._connection.send(frame)


class Client:
    """A connection to ``npctalk serve``. ``timeout``: seconds of server silence (while something is
    pending) before the connection counts as lost; ``retries``: resends of a request after that;
    ``heartbeat``: ping interval while something is pending."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, timeout: float = TIMEOUT_S, retries: int = RETRIES,
                 heartbeat: float = HEARTBEAT_S, context: zmq.Context | None = None,
                 curve: CurveClientKeys | None = None) -> None:
        self._core = ClientCore(timeout=timeout, retries=retries, heartbeat=heartbeat)
        self._connection = Connection(context or zmq.Context.instance(), endpoint, self._core, curve)
        self.endpoint = endpoint

    def hello(self) -> dict[str, Any]:
        """Server version, protocol, model and capabilities."""
        return self._call(Op.HELLO)

    def ping(self) -> float:
        """Round trip in seconds."""
        start = time.perf_counter()
        self._call(Op.PING)
        return time.perf_counter() - start

    def upsert_npc(self, npc: str, persona: Mapping[str, Any]) -> bool:
        """Register or replace an NPC (fields of ``npctalk.engine.persona.Persona``); True if it is new."""
        return bool(self._call(Op.NPC_UPSERT, npc=npc, persona=dict(persona))["created"])

    def get_npc(self, npc: str) -> dict[str, Any]:
        """The NPC's persona fields."""
        return dict(self._call(Op.NPC_GET, npc=npc)["persona"])

    def list_npcs(self) -> list[dict[str, Any]]:
        """``[{npc, name, role}, …]``."""
        return list(self._call(Op.NPC_LIST)["npcs"])

    def stats(self) -> dict[str, Any]:
        """Active and queued streams, tokens/s and counters."""
        return self._call(Op.STATS)

    def memory(self, npc: str, player: str = "player") -> dict[str, Any]:
        """What ``npc`` remembers of ``player``: ``{turns, facts, summary}`` (PROTOCOL.md, Memory)."""
        return {k: v for k, v in self._call(Op.MEMORY_GET, npc=npc, player=player).items() if k in _MEMORY_FIELDS}

    def remember(self, npc: str, fact: str, *, player: str = "player") -> dict[str, Any]:
        """Tell ``npc`` a fact about ``player`` ("The player saved the mill."); the stored fact with its id."""
        return dict(self._call(Op.MEMORY_REMEMBER, npc=npc, player=player, fact=fact)["fact"])

    def forget(self, npc: str, fact_id: int | None = None, *, player: str = "player") -> int:
        """Forget one fact by id, or every fact of the pair when ``fact_id`` is None; how many went."""
        fields = {"fact_id": fact_id} if fact_id is not None else {"all": True}
        return int(self._call(Op.MEMORY_FORGET, npc=npc, player=player, **fields)["forgotten"])

    def clear_memory(self, npc: str, player: str | None = None) -> int:
        """Forget ``npc``'s memories of ``player`` (None: of every player); how many pairs had any."""
        return int(self._call(Op.MEMORY_CLEAR, npc=npc, player=player)["cleared"])

    def export_save(self, *, npc: str | None = None, player: str | None = None) -> bytes:
        """Every memory (or one NPC's / one player's) as an opaque blob for the game's save file."""
        return bytes(self._call(Op.SAVE_EXPORT, npc=npc, player=player)["save"])

    def import_save(self, save: bytes, mode: str = "replace") -> int:
        """Load a blob from ``export_save`` (``replace`` its scope, or ``merge``); how many pairs it held."""
        return int(self._call(Op.SAVE_IMPORT, save=bytes(save), mode=mode)["pairs"])

    def say(self, npc: str, text: str, *, player: str = "player", context: Mapping[str, Any] | None = None,
            max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
            top_k: int | None = None, seed: int | None = None, deadline_ms: int | None = None) -> Reply:
        """Send the player's line; returns at once with the streaming ``Reply``."""
        view, frame = self._core.say(npc, text, player=player, context=context, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                     deadline_ms=deadline_ms)
        self._connection.send(frame)
        return Reply(self, view)

    def poll(self) -> list[Event]:
        """Everything that has arrived, without waiting: call it once per game frame."""
        self._core.check_open()
        self._connection.drain()
        self._connection.service()
        return self._core.take_events()

    def close(self) -> None:
        """Fail what is pending with ``ClientClosed`` and close the socket."""
        self._connection.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, op: Op, **fields: Any) -> dict[str, Any]:
        call = self._core.call(op, **fields)
        self._connection.send(call.frame)
        self._wait(lambda: call.finished)
        return call.result()

    def _wait(self, ready: Callable[[], bool]) -> None:
        """Receive and service until ``ready()``; the core's timeouts bound every wait."""
        while not ready():
            self._core.check_open()
            if self._connection.socket.poll(self._connection.wait_ms(), zmq.POLLIN):
                self._connection.drain()
            self._connection.service()
