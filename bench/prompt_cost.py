"""A say's host work: the engine's text caches against splitting and tokenizing every text again.

    python -m bench.prompt_cost [--bundle BUNDLE] [--turns 0 10 30] [--says 40] [--rounds 3]

Every say re-reads the NPC's persona and the whole conversation with the player, so without a cache
the tokenizer runs over all of it on every say. ``DialogueFormatter`` keeps each text's ids; this
times ``PromptBuilder.persona_prefix`` + ``build`` (what the server's ``say`` handler runs) for a
built-in persona with a history of N turns and a new line each say, alternating rounds where the
cache is cleared before every say (the peer: every text tokenized, as before the cache) and rounds
where it is kept. Reports the median ms per say of each and their ratio.

Then the whole of a say as the server's handler takes it (``Handlers.handle``: the request parsed,
memory recalled, the prompt built, grounding and fact steering for the line, the request queued),
on a fresh in-memory store, with every cache of the engine's texts cleared before each say (the
formatter's ids, ``grounding``'s words, content words and facts) against kept, alternating rounds.
Writes ``bench/results/prompt-cost-<host>-<date>[-tag].{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.bundle_run import write_files

log = logging.getLogger("bench.prompt_cost")
RESULTS = Path(__file__).resolve().parent / "results"
LINES = ("Hello there, smith! How goes the forge today? Any work for a traveller like me?",
         "Aye, busy as ever. The mayor wants new hinges for the hall doors, and the miller broke his axle again.")


def alternate(rounds: int, says: int, clear: Callable[[], None], say: Callable[[int], None]) -> tuple[float, float]:
    """Median ms of ``say(n)`` with ``clear()`` run before each (the caches emptied) and without it,
    in alternating rounds of ``says`` each; the first of each is left out (warm-up)."""
    times: dict[bool, list[float]] = {True: [], False: []}
    count = 0
    for _ in range(rounds):
        for cleared in times:
            for _ in range(says):
                if cleared:
                    clear()
                start = time.perf_counter()
                say(count)
                times[cleared].append((time.perf_counter() - start) * 1000)
                count += 1
    return statistics.median(times[True][1:]), statistics.median(times[False][1:])


def measure(bundle: Path, npc: str, turns: int, says: int, rounds: int) -> dict[str, Any]:
    from npctalk.engine.bundle import load_manifest
    from npctalk.engine.dialogue import Turn
    from npctalk.engine.npcs import PromptBuilder
    from npctalk.engine.persona import builtin_personas
    from npctalk.engine.tokenizer import Tokenizer

    builder = PromptBuilder(load_manifest(bundle), Tokenizer.from_file(bundle / "tokenizer.json"))
    persona = builtin_personas()[npc]
    history = [Turn("user" if i % 2 == 0 else "assistant", f"{LINES[i % 2]} ({i})") for i in range(turns)]
    prompt_tokens = [0]

    def say(n: int) -> None:
        prefix = builder.persona_prefix(persona, "Ava")
        ids = builder.build(persona, history, f"What news from the village? ({n})", {"location": "the forge"},
                            128, player="Ava", persona_prefix=prefix)
        prompt_tokens[0] = len(ids)

    tokenized, cached = alternate(rounds, says, builder.formatter._encode.cache_clear, say)
    return {"turns": turns, "prompt_tokens": prompt_tokens[0], "tokenized_ms": round(tokenized, 4),
            "cached_ms": round(cached, 4), "speedup": round(tokenized / cached, 1)}


def measure_handle(bundle: Path, npc: str, says: int, rounds: int) -> dict[str, Any]:
    import msgpack

    from npctalk.engine import grounding
    from npctalk.engine.handlers import Handlers
    from npctalk.engine.model import Model
    from npctalk.engine.npcs import NpcRegistry
    from npctalk.engine.scheduler import Scheduler, SchedulerConfig
    from npctalk.engine.server import ServerConfig
    from npctalk.engine.store import MemoryStore

    model = Model(bundle, provider="cpu", intra_op_threads=1)
    total = 2 * says * rounds + 1
    handlers = Handlers(model, Scheduler(model, SchedulerConfig(max_batch=1, max_queue=total)), ServerConfig(),
                        NpcRegistry.with_builtins(None, 16), MemoryStore())

    def clear() -> None:
        handlers.prompts.formatter._encode.cache_clear()
        for cached in (grounding._words, grounding.content, grounding._fact):
            cached.cache_clear()

    def say(n: int) -> None:
        frame = msgpack.packb({"v": 1, "id": f"s{n}", "op": "say", "npc": npc, "player": "Ava",
                               "text": f"What news from the village? ({n})", "max_new_tokens": 64})
        reply = handlers.handle(b"bench", [frame])
        if reply is not None:
            raise RuntimeError(f"the say was refused: {reply}")

    uncached, cached = alternate(rounds, says, clear, say)
    return {"uncached_ms": round(uncached, 4), "cached_ms": round(cached, 4), "speedup": round(uncached / cached, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="a bundle (default: the default model's)")
    parser.add_argument("--npc", default="bram")
    parser.add_argument("--turns", type=int, nargs="+", default=[0, 10, 30])
    parser.add_argument("--says", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from npctalk.engine.paths import default_bundle_path

    bundle = args.bundle or default_bundle_path()
    rows = []
    for turns in args.turns:
        rows.append(measure(bundle, args.npc, turns, args.says, args.rounds))
        log.info("%d turns of history: %s", turns, rows[-1])
    handle = measure_handle(bundle, args.npc, args.says, args.rounds)
    log.info("a whole say: %s", handle)
    date = dt.datetime.now(dt.timezone.utc)
    report = {"date": date.isoformat(timespec="seconds"), "host": platform.node(), "python": platform.python_version(),
              "bundle": bundle.name, "npc": args.npc, "says": args.says, "rounds": args.rounds, "rows": rows,
              "handle": handle}
    table = ["| history turns | prompt tokens | every text tokenized ms/say | cached ms/say | × |", "|---:|---:|---:|---:|---:|"]
    table += [f"| {r['turns']} | {r['prompt_tokens']} | {r['tokenized_ms']} | {r['cached_ms']} | {r['speedup']} |" for r in rows]
    markdown = (f"# Building a say's prompt ({bundle.name}, persona {args.npc})\n\n{report['date']} · {report['host']} · "
                f"Python {report['python']}\n\n`PromptBuilder.persona_prefix` + `build` per say, a new line each say, "
                f"{args.rounds} alternating rounds of {args.says} says each way; median ms per say.\n\n" + "\n".join(table) + "\n"
                f"\nA whole say in the server's handler (`Handlers.handle`, no history): {handle['uncached_ms']} ms with "
                f"every text cache cleared before it, {handle['cached_ms']} ms kept ({handle['speedup']}×).\n")
    write_files(args.out, ["prompt-cost", platform.node(), date.date().isoformat(), args.tag], report, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
