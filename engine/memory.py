"""Dialogue memory: the recent turns of every (NPC, player) pair, in memory.

This is the simple version the server starts with: each pair keeps its last ``max_turns`` turns,
and at most ``max_pairs`` pairs are kept (the least recently used pair is forgotten first), so a
game that invents player ids forever cannot grow the server without bound. Nothing survives a
restart; persistent memory comes later behind the same ``turns``/``record`` calls.

Not thread-safe: the engine loop owns it.
"""

from __future__ import annotations

from collections import OrderedDict

from .dialogue import Turn


class DialogueMemory:
    """``turns(npc, player)`` → oldest-first list of ``Turn``; ``record`` appends one exchange."""

    def __init__(self, max_turns: int = 16, max_pairs: int = 4096) -> None:
        self.max_turns = max_turns
        self.max_pairs = max_pairs
        self._pairs: OrderedDict[tuple[str, str], list[Turn]] = OrderedDict()

    def turns(self, npc: str, player: str) -> list[Turn]:
        return list(self._pairs.get((npc, player), ()))

    def record(self, npc: str, player: str, line: str, reply: str) -> None:
        """Remember the player's ``line`` and the NPC's ``reply`` (oldest turns fall off)."""
        key = (npc, player)
        turns = self._pairs.pop(key, [])
        turns += [Turn("user", line.strip()), Turn("assistant", reply.strip())]
        self._pairs[key] = turns[-self.max_turns:] if self.max_turns else []
        while len(self._pairs) > self.max_pairs:
            self._pairs.popitem(last=False)

    def forget_npc(self, npc: str) -> None:
        """Drop every conversation with ``npc`` (its persona changed)."""
        for key in [k for k in self._pairs if k[0] == npc]:
            del self._pairs[key]

    def __len__(self) -> int:
        return len(self._pairs)
