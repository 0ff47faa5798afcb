"""A game's frame loop beside an NPC reply: what ONNX Runtime's thread count and spinning cost the game.

    python -m bench.threads [--bundle PATH] [--work-ms 6] [--replies 3] [--repeats 2]

A separate "game" process runs a 60 fps loop: each frame does a fixed amount of CPU work (calibrated
alone to ``--work-ms``) and sleeps to the next 16.7 ms deadline. Meanwhile this process generates
NPC replies (64-token prompt, 128 greedy new tokens) with each engine setting in turn (threads,
spinning on/off), interleaved over ``--repeats`` rounds, plus rounds with no reply running. Per
setting: the reply's end-to-end tokens/s and CPU seconds per token (all its threads), and the
game's frame work time p50/p99 and the share of frames that missed their 16.7 ms deadline.
Writes ``bench/results/threads-<model>-<host>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import multiprocessing as mp
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.bundle_run import add_common, parse, write

log = logging.getLogger("bench.threads")
FRAME_S = 1 / 60
PROMPT_TOKENS, NEW_TOKENS = 64, 128


@dataclass(frozen=True)
class Setting:
    name: str
    threads: int | None   # None: no reply runs (the game alone)
    spin: bool = True


def settings(cores: int) -> list[Setting]:
    rows = [Setting("game alone", None), Setting("1 thread", 1)]
    if cores > 1:
        rows += [Setting(f"{cores} threads, spinning", cores, True), Setting(f"{cores} threads, no spinning", cores, False)]
    return rows


def _work(units: int) -> float:
    total = 0.0
    for i in range(units):
        total += (i % 7) * 0.5
    return total


def calibrate(work_ms: float) -> int:
    """Loop iterations that take ``work_ms`` on an idle core (median of a few tries)."""
    probe = 200_000
    times = []
    for _ in range(5):
        start = time.perf_counter()
        _work(probe)
        times.append(time.perf_counter() - start)
    return max(1, int(probe * (work_ms / 1000) / float(np.median(times))))


def game(units: int, stop: Any, out: Any) -> None:
    """The game process: frames of fixed work until ``stop`` is set; sends (work_s, missed) per frame."""
    deadline = time.perf_counter()
    frames: list[tuple[float, bool]] = []
    while not stop.is_set():
        start = time.perf_counter()
        _work(units)
        end = time.perf_counter()
        deadline += FRAME_S
        frames.append((end - start, end > deadline))
        if deadline > end:
            time.sleep(deadline - end)
        else:
            deadline = end  # a late frame: start the next at once, do not try to catch up
    out.send(frames)


def reply_round(bundle: Path, setting: Setting, replies: int) -> dict[str, float]:
    """``replies`` greedy replies (EOS never stops one) timed end to end, wall and CPU time."""
    from npctalk.engine.model import Model

    model = Model(bundle, provider="cpu", intra_op_threads=setting.threads, spin=setting.spin)
    prompt = np.random.default_rng(0).integers(100, model.manifest.vocab_size, (1, PROMPT_TOKENS))
    model.forward(prompt[:, :8], model.new_cache(1))              # first-run allocations out of the timing
    tokens, wall, cpu = 0, 0.0, 0.0
    for _ in range(replies):
        start, cpu_start = time.perf_counter(), time.process_time()
        cache = model.new_cache(1)
        token = int(model.forward(prompt, cache)[0].argmax())
        for _ in range(NEW_TOKENS - 1):
            token = int(model.forward(np.array([[token]]), cache)[0].argmax())
        wall += time.perf_counter() - start
        cpu += time.process_time() - cpu_start
        tokens += NEW_TOKENS
    return {"tokens": tokens, "wall_s": wall, "cpu_s": cpu}


def measure(bundle: Path, setting: Setting, units: int, replies: int, idle_s: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    stop, (receive, send) = ctx.Event(), ctx.Pipe(duplex=False)
    proc = ctx.Process(target=game, args=(units, stop, send), daemon=True)
    proc.start()
    time.sleep(0.5)                               # let the game settle into its loop
    result: dict[str, Any] = {}
    if setting.threads is None:
        time.sleep(idle_s)
    else:
        result = reply_round(bundle, setting, replies)
    stop.set()
    frames = receive.recv()
    proc.join(5)
    work = np.array([f[0] for f in frames]) * 1000
    result.update(frames=len(frames), work_p50_ms=float(np.percentile(work, 50)),
                  work_p99_ms=float(np.percentile(work, 99)), missed=float(np.mean([f[1] for f in frames])))
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    from npctalk.engine.bundle import load_manifest

    cores = os.cpu_count() or 1
    units = calibrate(args.work_ms)
    rows = settings(cores)
    samples: dict[str, list[dict[str, Any]]] = {s.name: [] for s in rows}
    for round_ in range(args.repeats):
        for setting in rows:
            sample = measure(args.bundle, setting, units, args.replies, args.idle_s)
            samples[setting.name].append(sample)
            log.info("round %d/%d · %s: %s", round_ + 1, args.repeats, setting.name,
                     {k: round(v, 3) if isinstance(v, float) else v for k, v in sample.items()})
    table = []
    for setting in rows:
        got = samples[setting.name]
        row: dict[str, Any] = {"setting": setting.name, "threads": setting.threads, "spin": setting.spin}
        if setting.threads is not None:
            tokens, wall, cpu = (sum(s[k] for s in got) for k in ("tokens", "wall_s", "cpu_s"))
            row.update(tok_s=round(tokens / wall, 1), cpu_ms_per_token=round(1000 * cpu / tokens, 2))
        row.update(game_work_p50_ms=round(float(np.median([s["work_p50_ms"] for s in got])), 2),
                   game_work_p99_ms=round(float(max(s["work_p99_ms"] for s in got)), 2),
                   game_missed=round(float(np.mean([s["missed"] for s in got])), 4),
                   frames=int(sum(s["frames"] for s in got)))
        table.append(row)
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"host": platform.node(), "cores": cores, "load_before": os.getloadavg()[0]},
            "model": load_manifest(args.bundle).name, "dtype": load_manifest(args.bundle).dtype,
            "bundle": str(args.bundle), "work_ms": args.work_ms, "replies_per_round": args.replies,
            "repeats": args.repeats, "rows": table}


def markdown(report: dict[str, Any], note: str) -> str:
    m = report["machine"]
    lines = [f"# A game frame loop beside an NPC reply: {report['model']} ({report['dtype']})", "",
             f"{report['date']} · {m['host']} · {m['cores']} cores · load average before the run {m['load_before']:.2f}", "",
             f"Game: 60 fps, {report['work_ms']} ms of CPU work per frame (calibrated alone). Reply: {PROMPT_TOKENS}-token "
             f"prompt, {NEW_TOKENS} greedy new tokens, {report['replies_per_round']} per round, {report['repeats']} "
             "interleaved rounds per setting.", ""]
    if note:
        lines += [f"**Note:** {note}", ""]
    lines += ["| setting | reply tok/s | CPU ms / token | game work p50 ms | game work p99 ms | frames late |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['setting']} | {r.get('tok_s', '—')} | {r.get('cpu_ms_per_token', '—')} | "
                     f"{r['game_work_p50_ms']} | {r['game_work_p99_ms']} | {r['game_missed'] * 100:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.threads", description=__doc__.splitlines()[0])
    parser.add_argument("--work-ms", type=float, default=6.0, help="the game's CPU work per frame")
    parser.add_argument("--replies", type=int, default=3, help="replies per round and setting")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--idle-s", type=float, default=5.0, help="length of a 'game alone' round")
    add_common(parser)
    args = parse(parser, argv)
    report = run(args)
    write(args, "threads", report, markdown(report, args.note))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
