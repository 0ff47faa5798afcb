"""The SQLite memory store: transactions, the recent window and summary, facts, retrieval, save slots,
and clear errors for databases it cannot use. Real SQLite files in tmp_path."""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import msgpack
import pytest
import zlib

from npctalk.engine.facts import NewFact
from npctalk.engine.memory import MemoryConfig
from npctalk.engine.memory_save import SaveFormatError, export_blob, import_blob
from npctalk.engine.store import SCHEMA_VERSION, MemoryStore, StoreError


def ticking() -> itertools.count[float]:
    return itertools.count(1000.0)


@pytest.fixture
def store(tmp_path: Path) -> MemoryStore:
    clock = ticking()
    s = MemoryStore(MemoryConfig(path=str(tmp_path / "memory.sqlite3"), recent_turns=4), clock=lambda: next(clock))
    yield s
    s.close()


def test_a_turn_is_one_transaction_with_its_facts(store: MemoryStore, tmp_path: Path) -> None:
    turn = store.record("bram", "p1", "  My name is Mira and I bought the iron sword.  ", " A fine blade. ")
    [saved] = store.turns("bram", "p1")
    assert (saved.id, saved.line, saved.reply) == (turn, "My name is Mira and I bought the iron sword.", "A fine blade.")
    facts = store.facts("bram", "p1")
    assert [(f.text, f.source, f.turn_id) for f in facts] == [
        ("The player's name is Mira.", "dialogue", turn), ("The player bought the iron sword.", "dialogue", turn)]
    # Another connection sees it committed; other pairs see nothing.
    other = sqlite3.connect(tmp_path / "memory.sqlite3")
    assert other.execute("SELECT COUNT(*) FROM turns").fetchone()[0] == 1
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    other.close()
    assert store.turns("bram", "p2") == [] and store.turns("elda", "p1") == []


def test_a_failing_turn_writes_nothing(store: MemoryStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.record("bram", "p", "first", "one")

    def broken_fold(*args: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store, "_fold", broken_fold)
    with pytest.raises(RuntimeError):
        store.record("bram", "p", "My name is Ada.", "two")  # the turn row and the fact were already written
    assert [t.line for t in store.turns("bram", "p")] == ["first"] and store.facts("bram", "p") == []


def test_old_turns_fold_into_the_summary(store: MemoryStore) -> None:
    for i in range(5):  # the window keeps 4 lines: 2 exchanges
        store.record("bram", "p", f"Tell me about the harvest number {i}.", f"Harvest {i} was good.")
    assert [t.line for t in store.turns("bram", "p")] == [f"Tell me about the harvest number {i}." for i in (3, 4)]
    summary = store.summary("bram", "p")
    assert summary.splitlines() == [f'Player: "Tell me about the harvest number {i}." You: "Harvest {i} was good."'
                                    for i in range(3)]
    assert [(t.role, t.text) for t in store.history("bram", "p")][:2] == [
        ("user", "Tell me about the harvest number 3."), ("assistant", "Harvest 3 was good.")]


def test_facts_remember_forget_and_the_newest_name_wins(store: MemoryStore) -> None:
    store.record("bram", "p", "My name is Mira.", "Hello Mira.")
    store.record("bram", "p", "Actually, call me Ada.", "Hello Ada.")
    game = store.remember("bram", "p", NewFact("The player saved the mill from the fire."))
    assert game.source == "game" and game.keywords == ("fire", "mill", "saved")
    again = store.remember("bram", "p", NewFact("The player saved the mill from the fire."))
    assert again.id == game.id  # the same fact once
    texts = [f.text for f in store.facts("bram", "p")]
    assert texts == ["The player's name is Ada.", "The player saved the mill from the fire."]
    assert store.forget("bram", "p", game.id) == 1 and store.forget("bram", "p", game.id) == 0
    assert store.forget("bram", "p", None) == 1 and store.facts("bram", "p") == []


def test_facts_per_pair_are_bounded_oldest_first(tmp_path: Path) -> None:
    clock = ticking()
    store = MemoryStore(MemoryConfig(max_facts=3), clock=lambda: next(clock))
    store.remember("bram", "p", NewFact("The player's name is Mira.", "name"))
    for i in range(5):
        store.remember("bram", "p", NewFact(f"The player owns goat number {i}."))
    assert [f.text for f in store.facts("bram", "p")] == [
        "The player's name is Mira.", "The player owns goat number 3.", "The player owns goat number 4."]


def test_recall_picks_relevant_facts_and_the_summary(store: MemoryStore) -> None:
    store.record("bram", "p", "My name is Mira.", "Welcome.")
    store.remember("bram", "p", NewFact("The player bought the iron sword."))
    store.remember("bram", "p", NewFact("The player fears wolves."))
    for i in range(3):
        store.record("bram", "p", f"Weather talk {i}.", "Aye.")
    recall = store.recall("bram", "p", "Can you sharpen my sword?", {"location": "the forge"})
    assert [f.text for f in recall.facts] == ["The player's name is Mira.", "The player bought the iron sword."]
    assert 'Player: "My name is Mira."' in recall.summary
    wolves = store.recall("bram", "p", "Is it safe outside?", {"recent_events": ["wolves at the gate"]})
    assert "The player fears wolves." in [f.text for f in wolves.facts]  # the game context counts too


def test_clear_one_pair_or_all_of_an_npc(store: MemoryStore) -> None:
    for npc, player in (("bram", "a"), ("bram", "b"), ("elda", "a")):
        store.record(npc, player, "My name is Kit.", "Hi.")
    assert store.pair_count() == 3
    assert store.clear("bram", "a") == 1 and store.pairs() == [("bram", "b"), ("elda", "a")]
    assert store.clear("bram") == 1 and store.pairs() == [("elda", "a")]
    assert store.clear("bram") == 0


def test_memories_survive_reopening(tmp_path: Path) -> None:
    config = MemoryConfig(path=str(tmp_path / "m.sqlite3"))
    first = MemoryStore(config)
    first.record("bram", "p", "I'm from Eastwatch.", "Far away.")
    first.close()
    second = MemoryStore(config)
    assert [t.reply for t in second.turns("bram", "p")] == ["Far away."]
    assert [f.text for f in second.facts("bram", "p")] == ["The player is from Eastwatch."]
    second.close()


def test_export_then_import_restores_exactly(store: MemoryStore) -> None:
    for i in range(4):
        store.record("bram", "p", f"My name is Mira. I found key {i}.", f"Reply {i}.")
    store.record("elda", "p", "I love apples.", "Good.")
    store.record("bram", "q", "I'm Tom.", "Hi Tom.")
    before = {pair: (store.turns(*pair), store.facts(*pair), store.summary(*pair)) for pair in store.pairs()}
    blob, pairs = export_blob(store)
    assert pairs == 3 and isinstance(blob, bytes)
    store.clear("bram")
    store.clear("elda")
    assert import_blob(store, blob, "replace") == 3
    after = {pair: (store.turns(*pair), store.facts(*pair), store.summary(*pair)) for pair in store.pairs()}
    assert after.keys() == before.keys()
    for pair in before:
        (t0, f0, s0), (t1, f1, s1) = before[pair], after[pair]
        assert [(t.line, t.reply, t.created) for t in t0] == [(t.line, t.reply, t.created) for t in t1]
        assert [(f.text, f.kind, f.source, f.created) for f in f0] == [(f.text, f.kind, f.source, f.created) for f in f1]
        assert s0 == s1
        # Dialogue facts still point at the turn they came from (by position; ids are new).
        assert [t0.index(next(t for t in t0 if t.id == f.turn_id)) for f in f0 if f.turn_id in {t.id for t in t0}] == \
            [t1.index(next(t for t in t1 if t.id == f.turn_id)) for f in f1 if f.turn_id in {t.id for t in t1}]


def test_one_players_save_replaces_only_that_player(store: MemoryStore) -> None:
    store.record("bram", "p", "I have a red cloak.", "Nice.")
    store.record("bram", "q", "I have a blue cloak.", "Nice.")
    blob, pairs = export_blob(store, player="p")
    assert pairs == 1
    store.record("bram", "p", "I have a green hat.", "Hm.")
    import_blob(store, blob, "replace")
    assert [t.line for t in store.turns("bram", "p")] == ["I have a red cloak."]  # back to the save
    assert [t.line for t in store.turns("bram", "q")] == ["I have a blue cloak."]  # untouched


def test_merge_adds_what_is_missing_and_keeps_the_rest(store: MemoryStore) -> None:
    store.record("bram", "p", "I have a red cloak.", "Nice.")
    blob, _ = export_blob(store)
    store.record("bram", "p", "I have a green hat.", "Hm.")
    import_blob(store, blob, "merge")
    assert [t.line for t in store.turns("bram", "p")] == ["I have a red cloak.", "I have a green hat."]
    assert [f.text for f in store.facts("bram", "p")] == ["The player has a red cloak.", "The player has a green hat."]


def pack(data: object) -> bytes:
    return zlib.compress(msgpack.packb(data, use_bin_type=True))


GOOD = {"format": "npctalk-memory", "version": 1, "scope": {"npc": None, "player": None},
        "pairs": [{"npc": "bram", "player": "p", "summary": ["", 0], "turns": [["hi", "hello", 1.0]],
                   "facts": [["The player is kind.", "other", "game", 1.0, None]]}]}


@pytest.mark.parametrize(("blob", "message"), [
    (b"not zlib", "not a blob from save.export"),
    (zlib.compress(b"\xc1"), "not valid msgpack"),
    (pack({"format": "other"}), "not an npctalk memory save"),
    (pack({**GOOD, "version": 9}), "version 9"),
    (pack({**GOOD, "pairs": [{**GOOD["pairs"][0], "npc": ""}]}), "pairs\\[0\\].npc"),
    (pack({**GOOD, "pairs": [{**GOOD["pairs"][0], "turns": [["hi", "", 1.0]]}]}), "pairs\\[0\\].turns\\[0\\]"),
    (pack({**GOOD, "pairs": [{**GOOD["pairs"][0], "facts": [["x", "bogus", "game", 1.0, None]]}]}), "facts\\[0\\]"),
    (pack({**GOOD, "pairs": [{**GOOD["pairs"][0], "facts": [["x", "other", "game", 1.0, 5]]}]}), "turn index"),
    (pack({**GOOD, "pairs": GOOD["pairs"] * 2}), "twice"),
    (pack({**GOOD, "scope": {"npc": "elda", "player": None}}), "outside the save's scope"),
    (zlib.compress(b"\x00" * (65 << 20)), "inflates to more than"),
    (pack(GOOD)[:-3], "truncated"),
])
def test_a_bad_save_names_the_problem_and_writes_nothing(store: MemoryStore, blob: bytes, message: str) -> None:
    store.record("bram", "p", "I have a red cloak.", "Nice.")
    with pytest.raises(SaveFormatError, match=message):
        import_blob(store, blob, "replace")
    assert [t.line for t in store.turns("bram", "p")] == ["I have a red cloak."]
    assert import_blob(store, pack(GOOD), "replace") == 1  # the good one loads


def test_an_unusable_database_is_a_clear_error_at_open(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StoreError, match="garbage.sqlite3.*not a writable SQLite database"):
        MemoryStore(MemoryConfig(path=str(garbage)))
    foreign = tmp_path / "foreign.sqlite3"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE accounts (x)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="SQLite database of something else"):
        MemoryStore(MemoryConfig(path=str(foreign)))
    newer = tmp_path / "newer.sqlite3"
    db = sqlite3.connect(newer)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="Upgrade npctalk"):
        MemoryStore(MemoryConfig(path=str(newer)))
    with pytest.raises(StoreError, match="Cannot open .*unable to open"):
        MemoryStore(MemoryConfig(path=str(tmp_path)))  # a folder
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="Cannot create the folder"):
        MemoryStore(MemoryConfig(path=str(tmp_path / "file" / "m.sqlite3")))


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root writes read-only files")
def test_a_read_only_database_is_a_clear_error_at_open(tmp_path: Path) -> None:
    path = tmp_path / "ro.sqlite3"
    MemoryStore(MemoryConfig(path=str(path))).close()
    path.chmod(0o444)
    with pytest.raises(StoreError, match="ro.sqlite3"):
        MemoryStore(MemoryConfig(path=str(path)))


@pytest.mark.parametrize(("setting", "level"), [("full", 2), ("normal", 1)])
def test_synchronous_level_is_applied(tmp_path: Path, setting: str, level: int) -> None:
    store = MemoryStore(MemoryConfig(path=str(tmp_path / "m.sqlite3"), synchronous=setting))
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == level
    store.close()


def test_a_store_opened_on_one_thread_serves_on_another() -> None:
    """Servers are built on one thread and may run on another (in-process tests, npctalk evaluate)."""
    import threading

    store = MemoryStore()
    errors: list[BaseException] = []

    def use() -> None:
        try:
            store.record("bram", "p", "I have a map.", "Good.")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=use)
    thread.start()
    thread.join(10)
    assert errors == [] and [t.line for t in store.turns("bram", "p")] == ["I have a map."]


def test_a_version_1_database_is_migrated_and_keeps_its_memories(tmp_path: Path) -> None:
    from npctalk.engine.store import _MIGRATIONS

    path = tmp_path / "v1.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(_MIGRATIONS[1])
    db.execute("INSERT INTO facts (npc, player, text, kind, source, keywords, created) "
               "VALUES ('bram', 'p', 'The player is kind.', 'other', 'game', 'kind', 1.0)")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    store = MemoryStore(MemoryConfig(path=str(path)))
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert [f.text for f in store.facts("bram", "p")] == ["The player is kind."]
    columns = [row[1] for row in store.db.execute("PRAGMA table_info(facts)")]
    assert "embedding" in columns
    assert store.npcs() == {}                               # v3: the npcs table exists, empty
    store.close()


def test_saved_npc_personas_round_trip_and_the_latest_wins(store: MemoryStore) -> None:
    store.save_npc("guard_03", {"name": "Hesk", "role": "a gate guard", "traits": ["wary", "loyal"]})
    store.save_npc("mira", {"name": "Mira", "role": "the miller"})
    store.save_npc("mira", {"name": "Mirabel", "role": "the ferrywoman", "description": "Ünïcödé — fine"})
    assert store.npcs() == {"guard_03": {"name": "Hesk", "role": "a gate guard", "traits": ["wary", "loyal"]},
                            "mira": {"name": "Mirabel", "role": "the ferrywoman", "description": "Ünïcödé — fine"}}


def test_embeddings_on_without_the_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from npctalk.engine import memory_embeddings
    from npctalk.engine.errors import ConfigError

    monkeypatch.setattr(memory_embeddings, "model_zip", lambda: None)
    with pytest.raises(ConfigError, match=r"npctalk\[memory-embeddings\]"):
        MemoryStore(MemoryConfig(embeddings="on"))
    assert MemoryStore(MemoryConfig(embeddings="auto")).embedder is None  # auto: quietly off


def test_an_imported_summary_is_held_to_this_servers_size(store: MemoryStore) -> None:
    lines = "\n".join(f'Player: "line {i}" You: "reply {i}"' for i in range(500))
    blob = pack({**GOOD, "pairs": [{**GOOD["pairs"][0], "summary": [lines, 500]}]})
    import_blob(store, blob, "replace")
    summary = store.summary("bram", "p")
    assert len(summary) <= store.config.summary_chars and summary.endswith('"reply 499"')
