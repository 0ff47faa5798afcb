"""Saving the turns that end in one engine step: one commit per turn vs one commit for all.

    python bench/turn_commit.py [--turns 64] [--repeats 7] [--sync full]

The server saves a finished turn before it sends ``done``, on the engine loop, and with
``synchronous=FULL`` each commit is an fsync. When many NPC streams end in the same step (a burst
of replies, or replies that started together), one commit per turn stalls every other stream for
``turns`` fsyncs. ``MemoryStore.record_many`` (what the server uses) saves them with one commit.

Both ways write the same ``--turns`` exchanges (a name and a purchase each, so facts are taken from
the line too) to a fresh database file in a temporary folder on the disk the server would use;
they alternate repeat by repeat, so background load falls on both alike. Reports the median and
every run in milliseconds, and the ratio.

Writes ``bench/results/turn-commit-<machine>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from npctalk.engine.memory import MemoryConfig
from npctalk.engine.store import Exchange, MemoryStore

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("bench.turn_commit")


def one_commit_each(store: MemoryStore, exchanges: list[Exchange]) -> None:
    for e in exchanges:
        store.record(e.npc, e.player, e.line, e.reply)


def one_commit_for_all(store: MemoryStore, exchanges: list[Exchange]) -> None:
    failed = [r for r in store.record_many(exchanges) if isinstance(r, Exception)]
    assert not failed, failed


WAYS: dict[str, Callable[[MemoryStore, list[Exchange]], None]] = {
    "one commit per turn": one_commit_each,
    "one commit for the step (record_many)": one_commit_for_all,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=64, help="turns ending in the same engine step")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sync", choices=("full", "normal"), default="full", help="the server's --memory-sync")
    parser.add_argument("--folder", type=Path, default=None, help="where the databases go (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("npctalk").setLevel(logging.WARNING)

    exchanges = [Exchange("bram", f"player-{i}", f"My name is Ada{i}. I bought the iron sword.", "A fine choice.")
                 for i in range(args.turns)]
    runs: dict[str, list[float]] = {name: [] for name in WAYS}
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        for repeat in range(args.repeats):
            for name, way in WAYS.items():
                path = os.path.join(folder, f"{repeat}-{name[:8].replace(' ', '_')}.sqlite3")
                store = MemoryStore(MemoryConfig(path=path, synchronous=args.sync))
                start = time.perf_counter()
                way(store, exchanges)
                runs[name].append((time.perf_counter() - start) * 1000)
                store.close()
            log.info("repeat %d/%d: %s", repeat + 1, args.repeats,
                     ", ".join(f"{n} {v[-1]:.1f} ms" for n, v in runs.items()))
    medians = {name: statistics.median(v) for name, v in runs.items()}
    each, grouped = medians.values()
    machine = f"{platform.node()}-{os.cpu_count()}cpu"
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
              "platform": platform.platform(), "turns": args.turns, "sync": args.sync, "repeats": args.repeats,
              "runs_ms": runs, "median_ms": medians, "ratio": each / grouped}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"turn-commit-{platform.machine()}-{os.cpu_count()}cpu-{dt.date.today().isoformat()}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    lines = [f"# Saving {args.turns} turns that end in one engine step (synchronous={args.sync})", "",
             f"{report['date']} · {report['platform']}, {os.cpu_count()} CPUs · {args.repeats} repeats, "
             "alternating, a fresh database file each", "",
             "| way | median ms | runs (ms) |", "|---|---:|---|"]
    lines += [f"| {name} | {medians[name]:.1f} | {', '.join(f'{x:.1f}' for x in v)} |" for name, v in runs.items()]
    lines += ["", f"One commit for the step is **{each / grouped:.1f}×** faster: the engine loop (every other "
              "stream) waits that much less when these turns end together.", ""]
    text = "\n".join(lines)
    (args.out / f"{stem}.md").write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
