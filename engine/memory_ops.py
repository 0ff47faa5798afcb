"""The ``memory.*`` and ``save.*`` ops of protocol v1 → replies, over one ``MemoryStore``.

``Handlers`` registers ``MemoryOps.ops()`` beside its own ops and keeps the rule that nothing
escapes: bad input raises ``ProtocolError`` (answered with its code), a store failure is logged and
answered ``internal`` by ``Handlers.handle``. Not thread-safe: the engine loop owns it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import protocol
from .facts import game_fact
from .memory_save import SaveFormatError, export_blob, import_blob
from .protocol import ErrorCode, Op, ProtocolError
from .store import MemoryStore

Reply = dict[str, Any]


class MemoryOps:
    """Replies of the memory and save-slot ops."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def ops(self) -> dict[Op, Callable[[bytes, protocol.Request], Reply]]:
        return {Op.MEMORY_GET: self._get, Op.MEMORY_REMEMBER: self._remember, Op.MEMORY_FORGET: self._forget,
                Op.MEMORY_CLEAR: self._clear, Op.SAVE_EXPORT: self._export, Op.SAVE_IMPORT: self._import}

    def _get(self, identity: bytes, request: protocol.Request) -> Reply:
        p = request.params
        assert isinstance(p, protocol.MemoryRef)
        return protocol.ok(request.id, npc=p.npc, player=p.player,
                           turns=[t.to_wire() for t in self.store.turns(p.npc, p.player)],
                           facts=[f.to_wire() for f in self.store.facts(p.npc, p.player)],
                           summary=self.store.summary(p.npc, p.player))

    def _remember(self, identity: bytes, request: protocol.Request) -> Reply:
        p = request.params
        assert isinstance(p, protocol.MemoryRemember)
        try:
            fact = game_fact(p.fact)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from None
        return protocol.ok(request.id, npc=p.npc, player=p.player, fact=self.store.remember(p.npc, p.player, fact).to_wire())

    def _forget(self, identity: bytes, request: protocol.Request) -> Reply:
        p = request.params
        assert isinstance(p, protocol.MemoryForget)
        return protocol.ok(request.id, npc=p.npc, player=p.player, forgotten=self.store.forget(p.npc, p.player, p.fact_id))

    def _clear(self, identity: bytes, request: protocol.Request) -> Reply:
        p = request.params
        assert isinstance(p, protocol.MemoryClear)
        return protocol.ok(request.id, npc=p.npc, player=p.player, cleared=self.store.clear(p.npc, p.player))

    def _export(self, identity: bytes, request: protocol.Request) -> Reply:
        p = request.params
        assert isinstance(p, protocol.SaveExport)
        blob, pairs = export_blob(self.store, p.npc, p.player)
        if len(blob) > protocol.MAX_SAVE_BYTES:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"The save is {len(blob)} bytes, over the {protocol.MAX_SAVE_BYTES}-"
                                "byte limit of one message; export one player or one NPC at a time.")
        return protocol.ok(request.id, save=blob, pairs=pairs, bytes=len(blob))

    def _import(self, identity: bytes, request: protocol.Request) -> Reply:
        p = request.params
        assert isinstance(p, protocol.SaveImport)
        try:
            pairs = import_blob(self.store, p.save, p.mode)
        except SaveFormatError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from None
        return protocol.ok(request.id, pairs=pairs, mode=p.mode)
