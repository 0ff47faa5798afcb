"""kill -9 durability: a server SIGKILLed at random points during turns loses no acknowledged turn and
leaves no partial one.

Each round starts the real server on one SQLite file, keeps a few streams of short says going (each
``done`` starts that stream's next say), and SIGKILLs the server after a random fraction of a
second, while turns are being generated and committed. Then the file is opened as the next start
would open it and checked:

* ``PRAGMA integrity_check`` is ``ok``;
* every acknowledged turn (``done`` received, non-empty reply) is there whole: its line and exactly
  the reply the client saw;
* no partial turn: every stored turn is one the test sent, and both facts its line states are
  stored with it (same transaction); no fact points at a turn that is not there.

A turn committed just before the kill, whose ``done`` never arrived, may be stored: the promise is
"acknowledged ⇒ saved", and a saved turn is always whole.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from pathlib import Path

import pytest
import zmq

from server_process import LONG_STREAMS, ServerProcess, recv, send

ROUNDS = int(os.environ.get("NPCTALK_DURABILITY_ROUNDS", "200"))  # one SIGKILL each
STREAMS = 3                  # says in flight at once, each from its own player
MAX_KILL_DELAY_S = 0.3       # the kill lands uniformly in [0, this) after the server answers
MAX_TURNS_PER_PLAYER = 100   # stays inside --memory-turns 256, so no turn is folded into the summary
ARGS = (*LONG_STREAMS, "--max-new-tokens", "8", "--default-max-new-tokens", "3", "--memory-turns", "256",
        "--memory-embeddings", "off")  # SQLite durability is the point; the embedding model only slows each start
MIRA = {"name": "Mira", "role": "a herbalist"}


def facts_of(n: int) -> set[str]:
    return {f"The player found the key k{n}.", f"The player has coin c{n}."}


def line_of(n: int) -> str:
    return f"I found the key k{n}. I have coin c{n}."


class Round:
    """One server life: streams of says until the kill."""

    def __init__(self, proc: ServerProcess, number: int, counter: list[int]) -> None:
        self.proc, self.number, self.counter = proc, number, counter
        self.sock = proc.dealer()
        self.in_flight: dict[str, tuple[int, str]] = {}  # request id → (turn number, player)
        self.turns_by_player: dict[str, int] = {}
        self.acknowledged: dict[int, str] = {}  # turn number → reply text
        self.empty: set[int] = set()            # done with an empty reply: nothing to remember
        self.sent: set[int] = set()

    def say(self, stream: int) -> None:
        player = f"r{self.number}s{stream}"
        if self.turns_by_player.get(player, 0) >= MAX_TURNS_PER_PLAYER:
            return
        self.turns_by_player[player] = self.turns_by_player.get(player, 0) + 1
        n = self.counter[0] = self.counter[0] + 1
        request_id = f"t{n}"
        self.in_flight[request_id] = (n, player)
        self.sent.add(n)
        send(self.sock, op="say", id=request_id, npc="mira", player=player, text=line_of(n))

    def run_until(self, kill_at: float) -> None:
        for stream in range(STREAMS):
            self.say(stream)
        while (left := kill_at - time.monotonic()) > 0:
            if not self.sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                continue
            message = recv(self.sock)
            if message["type"] not in ("done", "error") or message["id"] not in self.in_flight:
                continue
            n, player = self.in_flight.pop(message["id"])
            if message["type"] == "done":
                if message["text"].strip():
                    self.acknowledged[n] = message["text"].strip()
                else:
                    self.empty.add(n)
            self.say(int(player.rsplit("s", 1)[1]))


def check_database(db: Path, acknowledged: dict[int, str], empty: set[int], sent: set[int]) -> int:
    """The checks in the module docstring; returns how many turns are stored."""
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        turns = {row[0]: row[1:] for row in con.execute("SELECT id, line, reply FROM turns")}
        by_line = {line: (turn_id, reply) for turn_id, (line, reply) in turns.items()}
        assert len(by_line) == len(turns), "a turn stored twice"
        facts: dict[int, set[str]] = {}
        for text, turn_id in con.execute("SELECT text, turn_id FROM facts"):
            assert turn_id in turns, f"fact {text!r} belongs to turn {turn_id}, which is not stored"
            facts.setdefault(turn_id, set()).add(text)
    finally:
        con.close()
    for n, reply in acknowledged.items():
        assert line_of(n) in by_line, f"acknowledged turn {n} is missing"
        assert by_line[line_of(n)][1] == reply, f"acknowledged turn {n} has another reply"
    for n in empty:
        assert line_of(n) not in by_line, f"turn {n} had an empty reply but was stored"
    numbers = {line_of(n): n for n in sent}
    for turn_id, (line, reply) in turns.items():
        assert line in numbers, f"stored turn {line!r} was never sent"
        assert reply.strip(), f"turn {turn_id} is stored with an empty reply"
        assert facts.get(turn_id) == facts_of(numbers[line]), f"turn {turn_id} is stored without its facts"
    return len(turns)


@pytest.mark.slow
def test_kill_9_loses_no_acknowledged_turn_and_leaves_no_partial_one(gpt2_bundle: Path, tmp_path: Path) -> None:
    seed = int(os.environ.get("NPCTALK_DURABILITY_SEED", str(random.SystemRandom().randrange(1 << 32))))
    rng = random.Random(seed)
    db = tmp_path / "memory.sqlite3"
    counter = [0]
    acknowledged: dict[int, str] = {}
    empty: set[int] = set()
    sent: set[int] = set()
    killed_mid_turn = 0
    for number in range(ROUNDS):
        proc = ServerProcess(gpt2_bundle, tmp_path, *ARGS, "--memory-db", str(db)).start()
        try:
            assert proc.request("npc.upsert", npc="mira", persona=MIRA)["type"] == "ok"
            play = Round(proc, number, counter)
            play.run_until(time.monotonic() + rng.uniform(0.0, MAX_KILL_DELAY_S))
            assert proc.process is not None
            proc.process.kill()  # SIGKILL: no handler, no flush, no close
            proc.process.wait(10)
            killed_mid_turn += bool(play.in_flight)
        finally:
            proc.stop()
        acknowledged.update(play.acknowledged)
        empty |= play.empty
        sent |= play.sent
        stored = check_database(db, acknowledged, empty, sent)
    print(f"seed {seed}: {ROUNDS} kills ({killed_mid_turn} with turns in flight), {len(sent)} turns sent, "
          f"{len(acknowledged)} acknowledged, {stored} stored")
    assert len(acknowledged) > ROUNDS, "too few turns completed to say anything"
    assert killed_mid_turn >= ROUNDS * 0.9, "the kills should land while turns are running"
