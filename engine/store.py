"""The memory store: every (NPC, player) pair's turns, facts and rolling summary in one SQLite file.

Schema (version in ``PRAGMA user_version``; ``_MIGRATIONS[n]`` brings a file from n-1 to n)::

    turns      id, npc, player, line, reply, created        one row per completed exchange
    facts      id, npc, player, text, kind, source, keywords, created, turn_id, embedding (v2)
    summaries  npc, player, text, folded, updated            the rolling summary of folded turns
    npcs       npc, persona (JSON), updated (v3)              personas games gave through npc.upsert

Durability: WAL journal, ``synchronous=FULL`` by default. A completed turn (player line, NPC
reply, facts taken from the line, the summary updated for turns leaving the recent window) is
written whole or not at all, and committed before the server sends ``done``. The turns that end
in the same engine step share one commit (``record_many``), each inside its own savepoint, so one
that fails is rolled back alone and the step pays one fsync, not one per turn
(``bench/turn_commit.py``: 64 turns 24.7 → 3.7 ms). In WAL mode NORMAL already survives ``kill -9``
(the WAL is written before COMMIT returns; only the fsync is deferred), but it can lose the last
commits on power loss or an OS crash, and then a turn the game saw acknowledged would be gone. FULL
fsyncs the WAL on every commit, so ``done`` means "on disk". The price is an fsync per commit, paid
on the engine loop: on the dev VM's ext4 disk a turn's commit took 3.9-5.5 ms with FULL against
0.5-0.9 ms with NORMAL (300 turns each, same run, an earlier session). ``serve --memory-sync
normal`` trades the power-loss guarantee for that time.

Not thread-safe: the engine loop owns it. ``check_same_thread`` is off because a server may be
built on one thread and run on another (tests, ``npctalk evaluate``); never use it from two at once.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import memory_embeddings
from .dialogue import Turn
from .errors import StoreError
from .facts import Fact, NewFact, extract_facts, keywords, retrieve
from .grounding import asked_topics
from .memory import MemoryConfig, Recall, fold_summary, query_keywords
from .memory_embeddings import SentenceEmbedder

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
EMBED_PER_RECALL = 8  # facts without an embedding embedded by one recall (a big import catches up over turns)
_MIGRATIONS = {
    1: """
    CREATE TABLE turns (
        id INTEGER PRIMARY KEY, npc TEXT NOT NULL, player TEXT NOT NULL,
        line TEXT NOT NULL, reply TEXT NOT NULL, created REAL NOT NULL);
    CREATE INDEX turns_pair ON turns (npc, player, created, id);
    CREATE TABLE facts (
        id INTEGER PRIMARY KEY, npc TEXT NOT NULL, player TEXT NOT NULL, text TEXT NOT NULL,
        kind TEXT NOT NULL, source TEXT NOT NULL CHECK (source IN ('dialogue', 'game')),
        keywords TEXT NOT NULL, created REAL NOT NULL, turn_id INTEGER,
        UNIQUE (npc, player, text));
    CREATE TABLE summaries (
        npc TEXT NOT NULL, player TEXT NOT NULL, text TEXT NOT NULL, folded INTEGER NOT NULL,
        updated REAL NOT NULL, PRIMARY KEY (npc, player));
    """,
    2: """
    ALTER TABLE facts ADD COLUMN embedding BLOB
    """,  # float32 sentence embedding (memory_embeddings), filled by the first recall that needs it
    3: """
    CREATE TABLE npcs (npc TEXT PRIMARY KEY, persona TEXT NOT NULL, updated REAL NOT NULL)
    """,  # npc.upsert survives a restart: the server loads these over its built-in and folder personas
}


@dataclass(frozen=True)
class Exchange:
    """One completed exchange to remember: the player's ``line`` to ``npc`` and the NPC's ``reply``."""

    npc: str
    player: str
    line: str
    reply: str


@dataclass(frozen=True)
class StoredTurn:
    """One completed exchange: the player's ``line`` and the NPC's ``reply``; ``created`` in Unix seconds."""

    id: int
    line: str
    reply: str
    created: float

    def to_wire(self) -> dict[str, object]:
        return {"id": self.id, "player": self.line, "npc": self.reply, "created": self.created}


class MemoryStore:
    """Opens (creating or migrating) the database at ``config.path``; ``StoreError`` when it cannot."""

    def __init__(self, config: MemoryConfig = MemoryConfig(), clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._now = clock
        self.db = _open(config.path, config.synchronous)
        self.embedder = _embedder(config.embeddings)
        log.info("Memory database %s: %d conversations; embedding retrieval %s.", config.path, self.pair_count(),
                 "on" if self.embedder else "off")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``); rolled back whole when the body raises."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.rollback()
            raise
        self.db.commit()

    # --- reading ----------------------------------------------------------------------------------------

    def turns(self, npc: str, player: str) -> list[StoredTurn]:
        """The pair's recent exchanges, oldest first."""
        rows = self.db.execute("SELECT id, line, reply, created FROM turns WHERE npc = ? AND player = ? "
                               "ORDER BY created, id", (npc, player)).fetchall()
        return [StoredTurn(*row) for row in rows]

    def history(self, npc: str, player: str) -> list[Turn]:
        """The recent exchanges as dialogue turns (player line, NPC reply, …), oldest first."""
        return [t for s in self.turns(npc, player) for t in (Turn("user", s.line), Turn("assistant", s.reply))]

    def facts(self, npc: str, player: str) -> list[Fact]:
        rows = self.db.execute("SELECT id, text, kind, source, created, keywords, turn_id FROM facts "
                               "WHERE npc = ? AND player = ? ORDER BY created, id", (npc, player)).fetchall()
        return [Fact(i, text, kind, source, created, tuple(kw.split()), turn) for i, text, kind, source, created, kw, turn
                in rows]

    def summary(self, npc: str, player: str) -> str:
        row = self.db.execute("SELECT text FROM summaries WHERE npc = ? AND player = ?", (npc, player)).fetchone()
        return row[0] if row else ""

    def recall(self, npc: str, player: str, line: str, context: Mapping[str, Any] | None = None) -> Recall:
        """What the NPC remembers for this turn: the facts relevant to ``line`` and ``context``, the summary."""
        about = " ".join(" ".join(map(str, v)) if isinstance(v, list) else str(v) for v in (context or {}).values())
        similarity = self._similarity(npc, player, f"{line} {about}".strip()) if self.embedder else None
        facts = retrieve(self.facts(npc, player), query_keywords(line, about), self.config.facts_per_turn, similarity,
                         topics=asked_topics(line))
        return Recall(tuple(facts), self.summary(npc, player))

    def _similarity(self, npc: str, player: str, query: str) -> dict[int, float]:
        """Cosine of each embedded fact with ``query``; embeds (and stores) up to EMBED_PER_RECALL new facts."""
        assert self.embedder is not None
        rows = self.db.execute("SELECT id, text, embedding FROM facts WHERE npc = ? AND player = ? AND kind != 'name'",
                               (npc, player)).fetchall()
        if not rows:
            return {}
        missing = [(i, text) for i, text, blob in rows if blob is None][:EMBED_PER_RECALL]
        if missing:
            new = {i: self.embedder.embed(text) for i, text in missing}
            with self.transaction() as db:
                db.executemany("UPDATE facts SET embedding = ? WHERE id = ?", [(v.tobytes(), i) for i, v in new.items()])
            rows = [(i, text, new[i].tobytes() if i in new else blob) for i, text, blob in rows]
        q = self.embedder.embed(query)
        return {i: float(np.frombuffer(blob, dtype=np.float32) @ q) for i, _, blob in rows
                if blob is not None and len(blob) == q.nbytes}  # another model's vectors are skipped

    def pair_count(self) -> int:
        """(NPC, player) pairs with anything remembered."""
        return int(self.db.execute(
            "SELECT COUNT(*) FROM (SELECT npc, player FROM turns UNION SELECT npc, player FROM facts "
            "UNION SELECT npc, player FROM summaries)").fetchone()[0])

    def pairs(self, npc: str | None = None, player: str | None = None) -> list[tuple[str, str]]:
        """Every remembered pair, optionally only one NPC's and/or one player's, sorted."""
        where, args = _scope(npc, player)
        rows = self.db.execute(f"SELECT npc, player FROM turns {where} UNION SELECT npc, player FROM facts {where} "
                               f"UNION SELECT npc, player FROM summaries {where} ORDER BY 1, 2", args * 3).fetchall()
        return [(n, p) for n, p in rows]

    def npcs(self) -> dict[str, dict[str, Any]]:
        """Personas saved by ``save_npc`` (as the maps ``npc.upsert`` took), by NPC id."""
        rows = self.db.execute("SELECT npc, persona FROM npcs ORDER BY npc").fetchall()
        return {npc: json.loads(persona) for npc, persona in rows}

    # --- writing ----------------------------------------------------------------------------------------

    def save_npc(self, npc: str, persona: Mapping[str, Any]) -> None:
        """Keep an NPC's persona (replacing an older one), committed before this returns."""
        with self.transaction() as db:
            db.execute("INSERT INTO npcs (npc, persona, updated) VALUES (?, ?, ?) ON CONFLICT (npc) DO UPDATE SET "
                       "persona = excluded.persona, updated = excluded.updated",
                       (npc, json.dumps(dict(persona), ensure_ascii=False, sort_keys=True), self._now()))

    def record(self, npc: str, player: str, line: str, reply: str) -> int:
        """Remember one completed exchange and everything it changes, in one transaction; the turn's id."""
        with self.transaction():
            return self._record(Exchange(npc, player, line, reply), self._now())

    def record_many(self, exchanges: Sequence[Exchange]) -> list[int | Exception]:
        """Remember several completed exchanges with one commit (one fsync): per exchange its turn id,
        or the exception that kept it out. Each exchange is whole or absent (a savepoint each: one
        that fails is rolled back alone); when the commit itself fails, every one is absent and
        gets that error. The server records the turns that end in the same engine step this way,
        so 64 streams ending together cost one fsync, not 64, on the engine loop."""
        if not exchanges:
            return []
        out: list[int | Exception] = []
        now = self._now()
        with self.transaction() as db:
            for exchange in exchanges:
                db.execute("SAVEPOINT exchange")
                try:
                    out.append(self._record(exchange, now))
                except Exception as exc:  # this exchange alone is left out; the others still commit
                    db.execute("ROLLBACK TO exchange")
                    out.append(exc)
                db.execute("RELEASE exchange")
        return out

    def _record(self, exchange: Exchange, now: float) -> int:
        npc, player, line, reply = exchange.npc, exchange.player, exchange.line.strip(), exchange.reply.strip()
        turn_id = int(self.db.execute("INSERT INTO turns (npc, player, line, reply, created) VALUES (?, ?, ?, ?, ?)",
                                      (npc, player, line, reply, now)).lastrowid or 0)
        for fact in extract_facts(line):
            self._add_fact(npc, player, fact, "dialogue", now, turn_id)
        self._fold(npc, player, now)
        return turn_id

    def remember(self, npc: str, player: str, fact: NewFact, source: str = "game") -> Fact:
        """Add one fact (an existing identical fact is kept and returned)."""
        now = self._now()
        with self.transaction():
            self._add_fact(npc, player, fact, source, now, None)
        return next(f for f in self.facts(npc, player) if f.text == fact.text)

    def forget(self, npc: str, player: str, fact_id: int | None) -> int:
        """Delete one fact by id, or every fact of the pair when ``fact_id`` is None; how many went."""
        with self.transaction() as db:
            if fact_id is None:
                return db.execute("DELETE FROM facts WHERE npc = ? AND player = ?", (npc, player)).rowcount
            return db.execute("DELETE FROM facts WHERE npc = ? AND player = ? AND id = ?",
                              (npc, player, fact_id)).rowcount

    def clear(self, npc: str, player: str | None = None) -> int:
        """Forget the pair (or every pair of ``npc`` when ``player`` is None); how many pairs had memories."""
        where, args = _scope(npc, player)
        with self.transaction() as db:
            count = len(self.pairs(npc, player))
            for table in ("turns", "facts", "summaries"):
                db.execute(f"DELETE FROM {table} {where}", args)
        return count

    def _add_fact(self, npc: str, player: str, fact: NewFact, source: str, now: float, turn_id: int | None) -> None:
        db = self.db
        if fact.kind == "name":  # a player has one name: the newest replaces the others
            db.execute("DELETE FROM facts WHERE npc = ? AND player = ? AND kind = 'name' AND text != ?",
                       (npc, player, fact.text))
        db.execute("INSERT OR IGNORE INTO facts (npc, player, text, kind, source, keywords, created, turn_id) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (npc, player, fact.text, fact.kind, source, " ".join(keywords(fact.text)), now, turn_id))
        db.execute("DELETE FROM facts WHERE id IN (SELECT id FROM facts WHERE npc = ? AND player = ? AND kind != 'name' "
                   "ORDER BY created DESC, id DESC LIMIT -1 OFFSET ?)", (npc, player, self.config.max_facts - 1))

    def _fold(self, npc: str, player: str, now: float) -> None:
        """Move the exchanges beyond the recent window into the pair's summary (inside a transaction)."""
        keep = self.config.recent_turns // 2
        old = self.db.execute("SELECT id, line, reply FROM turns WHERE npc = ? AND player = ? "
                              "ORDER BY created DESC, id DESC LIMIT -1 OFFSET ?", (npc, player, keep)).fetchall()
        if not old:
            return
        old.reverse()
        row = self.db.execute("SELECT text, folded FROM summaries WHERE npc = ? AND player = ?", (npc, player)).fetchone()
        text, folded = row if row else ("", 0)
        text = fold_summary(text, [(line, reply) for _, line, reply in old], self.config.summary_chars)
        self.db.execute("INSERT OR REPLACE INTO summaries (npc, player, text, folded, updated) VALUES (?, ?, ?, ?, ?)",
                        (npc, player, text, folded + len(old), now))
        self.db.executemany("DELETE FROM turns WHERE id = ?", [(i,) for i, _, _ in old])


def _embedder(setting: str) -> SentenceEmbedder | None:
    if setting == "off" or (setting == "auto" and not memory_embeddings.available()):
        return None
    return SentenceEmbedder()  # ConfigError naming the missing extra when "on" and not installed


def _scope(npc: str | None, player: str | None) -> tuple[str, tuple[str, ...]]:
    conditions = [(name, value) for name, value in (("npc", npc), ("player", player)) if value is not None]
    if not conditions:
        return "", ()
    return "WHERE " + " AND ".join(f"{name} = ?" for name, _ in conditions), tuple(v for _, v in conditions)


def _open(path: str, synchronous: str = "full") -> sqlite3.Connection:
    """Connect, check the file is a readable and writable npctalk memory database, migrate it."""
    where = "an in-memory database" if path == ":memory:" else f"the memory database {path}"
    if path != ":memory:":
        folder = Path(path).expanduser().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"Cannot create the folder of {where}: {exc.strerror}.") from exc
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(f"Cannot open {where}: {exc}. Check the path and its permissions, or pass another "
                         "--memory-db.") from exc
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if path != ":memory:" and mode != "wal":
            raise StoreError(f"Cannot switch {where} to WAL mode (it stays in {mode!r}).")
        db.execute("PRAGMA synchronous=" + ("FULL" if synchronous == "full" else "NORMAL"))
        db.execute("PRAGMA busy_timeout=2000")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise StoreError(f"{where[0].upper()}{where[1:]} is damaged (quick_check: {check}); move it away "
                             "to start with empty memories, or restore a backup.")
        _migrate(db, where)
    except sqlite3.DatabaseError as exc:
        db.close()
        raise StoreError(f"Cannot use {where}: {exc}. It is not a writable SQLite database; move it away or pass "
                         "another --memory-db.") from exc
    except StoreError:
        db.close()
        raise
    return db


def _migrate(db: sqlite3.Connection, where: str) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(f"{where[0].upper()}{where[1:]} has schema version {version}; this npctalk reads up to "
                         f"{SCHEMA_VERSION}. Upgrade npctalk or pass another --memory-db.")
    if version == 0:
        tables = db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        if tables:
            raise StoreError(f"{where[0].upper()}{where[1:]} is an SQLite database of something else "
                             f"({tables} tables, no npctalk schema version); pass another --memory-db.")
    # A write even when nothing migrates: an unwritable file fails here, at start, not at the first turn.
    db.execute("BEGIN IMMEDIATE")
    try:
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in filter(str.strip, _MIGRATIONS[step].split(";")):
                db.execute(statement)
            log.info("Memory database migrated to schema version %d.", step)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        db.rollback()
        raise
    db.commit()
