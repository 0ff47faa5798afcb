"""Save slots: every memory of a scope as one opaque blob (``save.export``), and back (``save.import``).

The blob is zlib-compressed msgpack, so a game stores it as bytes in its own save file::

    {format: "npctalk-memory", version: 1, scope: {npc: str|nil, player: str|nil},
     pairs: [{npc, player, summary: [text, folded],
              turns: [[line, reply, created], …],                     oldest first
              facts: [[text, kind, source, created, turn_index|nil], …]}]}

``turn_index`` points into the pair's ``turns`` (the turn a dialogue fact came from). Ids are not
saved: an import gives new ones. Importing checks every field (``SaveFormatError`` names the first
bad one) before it writes anything, then writes in one transaction:

* ``replace``: the memories inside the blob's scope (one player, one NPC, both, or everything) are
  deleted first, so loading a slot restores exactly what was saved.
* ``merge``: turns and facts not already present are added; an existing summary is kept.

Either way each pair is then folded to this server's recent-turn window.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import msgpack

from .errors import SaveFormatError, StoreError
from .facts import MAX_FACT_CHARS, SOURCES, NewFact
from .memory import fold_summary
from .store import MemoryStore

FORMAT = "npctalk-memory"
VERSION = 1
MAX_UNPACKED_BYTES = 64 << 20      # a save blob inflates to at most this
MAX_ID_CHARS = 64
MAX_LINE_CHARS = 16_000
KINDS = ("name", "origin", "other")
MODES = ("replace", "merge")


def export_blob(store: MemoryStore, npc: str | None = None, player: str | None = None) -> tuple[bytes, int]:
    """The memories of ``npc``/``player`` (None: all) as a blob, and how many pairs it holds."""
    pairs = []
    for n, p in store.pairs(npc, player):
        turns = store.turns(n, p)
        index = {t.id: i for i, t in enumerate(turns)}
        row = store.db.execute("SELECT text, folded FROM summaries WHERE npc = ? AND player = ?", (n, p)).fetchone()
        pairs.append({
            "npc": n, "player": p, "summary": list(row) if row else ["", 0],
            "turns": [[t.line, t.reply, t.created] for t in turns],
            "facts": [[f.text, f.kind, f.source, f.created, index.get(f.turn_id) if f.turn_id is not None else None]
                      for f in store.facts(n, p)],
        })
    data = {"format": FORMAT, "version": VERSION, "scope": {"npc": npc, "player": player}, "pairs": pairs}
    return zlib.compress(msgpack.packb(data, use_bin_type=True), 6), len(pairs)


def import_blob(store: MemoryStore, blob: bytes, mode: str) -> int:
    """Load a blob written by ``export_blob``; how many pairs it held. Nothing is written on error."""
    if mode not in MODES:
        raise SaveFormatError(f"The import mode must be one of {list(MODES)}, got {mode!r}.")
    data = _unpack(blob)
    scope = _field(data, "scope", dict, "the save")
    scope_npc, scope_player = (_optional_id(scope, name, "the save's scope") for name in ("npc", "player"))
    raw_pairs = _field(data, "pairs", list, "the save")
    pairs = [_check_pair(item, i) for i, item in enumerate(raw_pairs)]
    seen: set[tuple[str, str]] = set()
    for pair in pairs:
        key = (pair["npc"], pair["player"])
        if key in seen:
            raise SaveFormatError(f"The save holds the pair {key} twice.")
        if (scope_npc or key[0]) != key[0] or (scope_player or key[1]) != key[1]:
            raise SaveFormatError(f"The pair {key} lies outside the save's scope (npc {scope_npc!r}, player "
                                  f"{scope_player!r}).")
        seen.add(key)
    with store.transaction() as db:
        if mode == "replace":
            for table in ("turns", "facts", "summaries"):
                where = " AND ".join(f"{n} = ?" for n, v in (("npc", scope_npc), ("player", scope_player)) if v)
                db.execute(f"DELETE FROM {table}" + (f" WHERE {where}" if where else ""),
                           tuple(v for v in (scope_npc, scope_player) if v))
        for pair in pairs:
            _write_pair(store, pair)
    return len(pairs)


def _write_pair(store: MemoryStore, pair: dict[str, Any]) -> None:
    db, npc, player = store.db, pair["npc"], pair["player"]
    existing = {(t.line, t.reply, t.created): t.id for t in store.turns(npc, player)}
    ids: list[int] = []
    for line, reply, created in pair["turns"]:
        if (line, reply, created) in existing:
            ids.append(existing[(line, reply, created)])
            continue
        ids.append(int(db.execute("INSERT INTO turns (npc, player, line, reply, created) VALUES (?, ?, ?, ?, ?)",
                                  (npc, player, line, reply, created)).lastrowid or 0))
    for text, kind, source, created, turn in pair["facts"]:
        store._add_fact(npc, player, NewFact(text, kind), source, created, None if turn is None else ids[turn])
    summary, folded = pair["summary"]
    summary = fold_summary(summary, [], store.config.summary_chars)  # this server's size limit
    if summary and not store.summary(npc, player):
        db.execute("INSERT OR REPLACE INTO summaries (npc, player, text, folded, updated) VALUES (?, ?, ?, ?, ?)",
                   (npc, player, summary, folded, store._now()))
    store._fold(npc, player, store._now())


def _unpack(blob: bytes) -> dict[str, Any]:
    if not isinstance(blob, bytes) or not blob:
        raise SaveFormatError("A save must be the non-empty bytes that save.export returned.")
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(blob, MAX_UNPACKED_BYTES)
    except zlib.error as exc:
        raise SaveFormatError(f"The save is not a blob from save.export (zlib: {exc}).") from None
    if inflater.unconsumed_tail:
        raise SaveFormatError(f"The save inflates to more than {MAX_UNPACKED_BYTES} bytes.")
    if not inflater.eof:
        raise SaveFormatError("The save is truncated.")
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise SaveFormatError(f"The save's contents are not valid msgpack: {exc}.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SaveFormatError(f"The save is not an npctalk memory save (format {FORMAT!r} expected).")
    if data.get("version") != VERSION:
        raise SaveFormatError(f"The save has version {data.get('version')!r}; this npctalk reads version {VERSION}.")
    return data


def _check_pair(item: Any, i: int) -> dict[str, Any]:
    where = f"pairs[{i}]"
    if not isinstance(item, dict):
        raise SaveFormatError(f"{where} must be a map.")
    npc, player = _id(item, "npc", where), _id(item, "player", where)
    summary = _field(item, "summary", list, where)
    if len(summary) != 2 or not isinstance(summary[0], str) or type(summary[1]) is not int or summary[1] < 0:
        raise SaveFormatError(f"{where}.summary must be [text, folded turn count].")
    turns = _field(item, "turns", list, where)
    for j, turn in enumerate(turns):
        if (not isinstance(turn, list) or len(turn) != 3 or not all(isinstance(s, str) and 0 < len(s) <= MAX_LINE_CHARS
                                                                    for s in turn[:2]) or not _time(turn[2])):
            raise SaveFormatError(f"{where}.turns[{j}] must be [player line, NPC reply, created], both lines "
                                  f"non-empty strings of at most {MAX_LINE_CHARS} characters.")
    facts = _field(item, "facts", list, where)
    for j, fact in enumerate(facts):
        ok = (isinstance(fact, list) and len(fact) == 5 and isinstance(fact[0], str)
              and 0 < len(fact[0]) <= MAX_FACT_CHARS and fact[1] in KINDS and fact[2] in SOURCES and _time(fact[3])
              and (fact[4] is None or (type(fact[4]) is int and 0 <= fact[4] < len(turns))))
        if not ok:
            raise SaveFormatError(f"{where}.facts[{j}] must be [text (1..{MAX_FACT_CHARS} chars), kind {list(KINDS)}, "
                                  f"source {list(SOURCES)}, created, turn index or nil].")
    return {"npc": npc, "player": player, "summary": summary, "turns": turns, "facts": facts}


def _field(data: dict[str, Any], name: str, kind: type, where: str) -> Any:
    value = data.get(name)
    if not isinstance(value, kind):
        raise SaveFormatError(f"{where} needs '{name}' of type {kind.__name__}, got {type(value).__name__}.")
    return value


def _id(data: dict[str, Any], name: str, where: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ID_CHARS:
        raise SaveFormatError(f"{where}.{name} must be a non-empty string of at most {MAX_ID_CHARS} characters.")
    return value


def _optional_id(data: dict[str, Any], name: str, where: str) -> str | None:
    return None if data.get(name) is None else _id(data, name, where)


def _time(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= 0
