"""Concurrent NPC streams through the real socket: aggregate tokens/s, TTFT, inter-token gaps.

    python bench/concurrency.py --model BUNDLE [--streams 1 8 32 64] [--max-new-tokens 128]

Starts ``npctalk serve`` as a subprocess on a free loopback port (greedy decoding without penalties,
so every reply runs to ``max_new_tokens`` and runs are comparable), then for each concurrency N
opens N replies at once from one ``AsyncClient`` (NPCs and players spread over the built-in
personas) and timestamps every token as it arrives. Writes
``bench/results/concurrency-<model>-<machine>-<date>.{json,md}``.

Metrics: aggregate tok/s = completion tokens of all N replies / wall time from the first send to
the last done; TTFT = client-side send → first token message (p50/p99 over replies); inter-token gap
= time between consecutive token messages of one reply (p99 over all gaps). ``protocol_us_per_token``
is the cost of encoding and parsing one token message; ``overhead_vs_engine`` compares one stream's
median gap through the socket with the same bundle's median decode step in-process (the engine
alone, measured right after the server stops): what server loop, protocol and sockets add per token.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import shlex
import socket
import statistics
import subprocess
import tempfile
import sys
import time
from pathlib import Path
from typing import Any

from bundle_run import decode_steps_ms
from npctalk.client import AsyncClient, Client
from npctalk.engine import protocol

NPCS = ("bram", "elda", "tobin")
ROOT = Path(__file__).resolve().parent


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def one_reply(client: AsyncClient, index: int, max_new_tokens: int, turn: int = 0) -> dict[str, Any]:
    """Stream ``index``'s reply number ``turn``: each turn has a player of its own, so every prompt is
    the same length (no conversation history builds up)."""
    sent = time.perf_counter()
    player = f"bench-{index}" if turn == 0 else f"bench-{index}-{turn}"
    reply = await client.say(NPCS[index % len(NPCS)], "Hello! What news from the village?", player=player,
                             max_new_tokens=max_new_tokens, seed=index + 1000 * turn)
    arrivals = []
    async for _ in reply:
        arrivals.append(time.perf_counter())
    result = await reply.wait()
    return {"sent": sent, "arrivals": arrivals, "tokens": result.usage.completion_tokens,
            "prompt_tokens": result.usage.prompt_tokens,
            "server_ttft_ms": result.timings.ttft_ms, "finish_reason": result.finish_reason}


def latency(ttft: list[float], gaps: list[float]) -> dict[str, float]:
    """p50/p99 of the times to first token and of the inter-token gaps (ms)."""
    return {"ttft_ms_p50": round(percentile(ttft, 50), 2), "ttft_ms_p99": round(percentile(ttft, 99), 2),
            "gap_ms_p50": round(percentile(gaps, 50), 3), "gap_ms_p99": round(percentile(gaps, 99), 3)}


async def run_level(endpoint: str, streams: int, max_new_tokens: int) -> dict[str, Any]:
    async with AsyncClient(endpoint, timeout=30.0) as client:
        await client.ping()
        start = time.perf_counter()
        replies = await asyncio.gather(*(one_reply(client, i, max_new_tokens) for i in range(streams)))
        wall = time.perf_counter() - start
        stats = await client.stats()
    sampled = stats.get("sampled", {})  # cumulative over the server's life: the caller takes differences
    tokens = sum(r["tokens"] for r in replies)
    prompt_tokens = statistics.median(r["prompt_tokens"] for r in replies)
    ttft = [(r["arrivals"][0] - r["sent"]) * 1000 for r in replies if r["arrivals"]]
    gaps = [(b - a) * 1000 for r in replies for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    return {
        "streams": streams, "completion_tokens": tokens, "wall_s": round(wall, 3),
        "aggregate_tok_s": round(tokens / wall, 1),
        **latency(ttft, gaps),
        "server_ttft_ms_p50": round(statistics.median(r["server_ttft_ms"] for r in replies), 2),
        "finish_reasons": sorted({r["finish_reason"] for r in replies}), "server_batched": stats["batched"],
        "server_prefill_chunk": stats.get("prefill_chunk"), "server_group_cached": stats.get("group_cached"),
        "prompt_tokens_p50": prompt_tokens, "sampled_total": sampled,
    }


async def run_steady(endpoint: str, streams: int, max_new_tokens: int, window_s: float, warmup_s: float) -> dict[str, Any]:
    """``streams`` NPC streams that each say again as soon as their reply is done, for ``warmup_s`` +
    ``window_s`` seconds: what a village of NPCs talking keeps up. Tokens/s is the server's own token
    count over the window (``stats``), so the start-up burst of prompts is outside it; TTFT and gaps
    count replies sent, and gaps seen, inside the window."""
    async with AsyncClient(endpoint, timeout=30.0) as client:
        await client.ping()
        replies: list[dict[str, Any]] = []
        closed = asyncio.Event()

        async def npc(index: int) -> None:
            turn = 0
            while not closed.is_set():
                replies.append(await one_reply(client, index, max_new_tokens, turn))
                turn += 1

        async def window() -> tuple[dict[str, Any], float, dict[str, Any], float]:
            # The window runs window_s from the first stats answer (a busy server may answer late).
            await asyncio.sleep(warmup_s)
            first, t0 = await client.stats(), time.perf_counter()
            await asyncio.sleep(window_s)
            last, t1 = await client.stats(), time.perf_counter()
            closed.set()
            return first, t0, last, t1

        measured, *_ = await asyncio.gather(window(), *(npc(i) for i in range(streams)))
    first, t0, last, t1 = measured
    inside = [r for r in replies if t0 <= r["sent"] <= t1]
    ttft = [(r["arrivals"][0] - r["sent"]) * 1000 for r in inside if r["arrivals"]]
    gaps = [(b - a) * 1000 for r in replies for a, b in zip(r["arrivals"], r["arrivals"][1:]) if t0 <= a and b <= t1]
    return {
        "streams": streams, "mode": "steady", "window_s": round(t1 - t0, 3), "replies_in_window": len(inside),
        "completion_tokens": last["tokens"] - first["tokens"],
        "aggregate_tok_s": round((last["tokens"] - first["tokens"]) / (t1 - t0), 1),
        **latency(ttft, gaps),
        "finish_reasons": sorted({r["finish_reason"] for r in replies}), "server_batched": last["batched"],
        "prompt_tokens_p50": statistics.median(r["prompt_tokens"] for r in replies),
        "sampled": {k: v - first.get("sampled", {}).get(k, 0) for k, v in last.get("sampled", {}).items()},
    }


def protocol_cost_us(repeats: int = 20000) -> float:
    """Encode + parse of one token message, in microseconds."""
    start = time.perf_counter()
    for i in range(repeats):
        protocol.parse_reply(protocol.encode(protocol.token("a1b2c3-17", i, " the")))
    return (time.perf_counter() - start) / repeats * 1e6


def engine_step_ms(bundle: Path, prompt_tokens: int, new_tokens: int, threads: int | None) -> float:
    """Median decode step of the same bundle in this process, no server (the engine alone), after a
    prompt of ``prompt_tokens``, with the server's threads and spinning: what a token costs without
    the protocol, loop and sockets."""
    from npctalk.engine.cli import server_threads
    from npctalk.engine.model import Model

    model = Model(bundle, provider="cpu", intra_op_threads=server_threads(threads), spin=False)
    return statistics.median(decode_steps_ms(model, prompt_tokens, new_tokens - 1))


def paced_note(paced: dict[str, Any]) -> str:
    """The report's sentence on a paced server (``bench/paced.py``): the times its runs were held to."""
    runs = paced["runs"]
    over = sum(r["over_target"] for r in runs.values())
    steps = ", ".join(f"{rows} rows {ms} ms" for rows, ms in paced["steps"])
    held = "; ".join(f"{kind} {r['runs']} × {r['wall_ms'] / max(r['runs'], 1):.2f} ms (target {r['target_ms'] / max(r['runs'], 1):.2f})"
                     for kind, r in sorted(runs.items()))
    return (f"\n\n**Paced** (`bench/paced.py`): no model runs; each decode step and prompt read takes the GPU's "
            f"time instead (decode step: {steps}, linear between; a prompt read: {paced['prefill_ms']} ms, or "
            f"{paced['prefill_ms_per_token']} ms a token when longer; outputs by rule). Runs over the server's "
            f"life, each kind's mean wall time: {held}; {over} ran over their target.")


def free_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os

    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "system": platform.platform()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model bundle folder")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="server ONNX Runtime threads")
    parser.add_argument("--provider", default="auto")
    parser.add_argument("--slot-context", type=int, default=None,
                        help="slots-layout (CUDA) bundles: tokens per stream's KV slot (serve --slot-context)")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--server-log", type=Path, default=None, help="write the server's log here")
    parser.add_argument("--top-tokens", type=int, default=None,
                        help="serve --top-tokens (candidates per row for sampled steps; 0: whole rows)")
    parser.add_argument("--tag", default="", help="appended to the result file names")
    parser.add_argument("--server-args", default="", help="more `npctalk serve` options, one string (shell words)")
    parser.add_argument("--steady", type=float, default=0.0, metavar="SECONDS",
                        help="steady state instead of one burst: each stream says again when its reply ends, and "
                             "tokens/s is the server's count over a SECONDS window after --warmup")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before the --steady window opens")
    parser.add_argument("--sampled", action="store_true",
                        help="the server's default sampling (temperature, top-k/p, repetition controls) instead of "
                             "greedy; replies may then end early at EOS")
    parser.add_argument("--paced", default=None, metavar="OPTIONS",
                        help="serve through bench/paced.py: every decoder run padded to a GPU's measured time "
                             "(its options, one string; '' for its H100 defaults)")
    args = parser.parse_args()

    endpoint = free_endpoint()
    scratch = tempfile.TemporaryDirectory(prefix="npctalk-concurrency-")  # a memory database of its own
    pace_report = Path(scratch.name) / "paced.json"
    serve = ([sys.executable, str(ROOT / "paced.py"), *shlex.split(args.paced), "--report", str(pace_report), "--"]
             if args.paced is not None else [sys.executable, "-m", "npctalk.engine.cli"])
    command = [*serve, "serve", "--model", str(args.model), "--bind", endpoint,
               "--provider", args.provider, "--max-batch", str(max(args.streams)), "--max-new-tokens",
               str(args.max_new_tokens)]
    if not args.sampled:
        command += ["--temperature", "0", "--no-repeat-ngram", "0", "--repetition-penalty", "1.0"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.slot_context:
        command += ["--slot-context", str(args.slot_context)]
    if args.top_tokens is not None:
        command += ["--top-tokens", str(args.top_tokens)]
    command += shlex.split(args.server_args)
    command += ["--memory-db", str(Path(scratch.name) / "memory.sqlite3"), "--memory-embeddings", "off"]
    server = subprocess.Popen(command, stderr=subprocess.DEVNULL if not args.server_log else open(args.server_log, "wb"))
    try:
        with Client(endpoint, timeout=2.0, retries=30) as probe:  # Lazy Pirate retries while the server starts
            hello = probe.hello()
        asyncio.run(run_level(endpoint, 2, 8))  # warm-up
        if args.steady:
            levels = [asyncio.run(run_steady(endpoint, n, args.max_new_tokens, args.steady, args.warmup))
                      for n in args.streams]
        else:
            levels = [asyncio.run(run_level(endpoint, n, args.max_new_tokens)) for n in args.streams]
        before: dict[str, int] = {}
        for level in levels:  # each level's own counts of tokens sampled from candidates / full rows
            if "sampled_total" not in level:
                continue  # a steady level counted its own window
            total = level.pop("sampled_total")
            level["sampled"] = {k: v - before.get(k, 0) for k, v in total.items()}
            before = total
    finally:
        server.terminate()
        server.wait(30)
        paced = json.loads(pace_report.read_text(encoding="utf-8")) if pace_report.exists() else None
        scratch.cleanup()
    # Protocol overhead per token: one stream's median gap through the socket minus the same bundle's
    # median decode step in-process (after a prompt as long as the server's), measured right after.
    single = next((level for level in levels if level["streams"] == 1), None)
    overhead = None
    if single is not None and hello["model"]["provider"] == "cpu":
        step = engine_step_ms(args.model, int(single["prompt_tokens_p50"]), args.max_new_tokens, args.threads)
        overhead = {"socket_gap_ms_p50": single["gap_ms_p50"], "engine_step_ms_p50": round(step, 3),
                    "overhead_ms_per_token": round(single["gap_ms_p50"] - step, 3)}

    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "model": hello["model"], "provider": hello["model"]["provider"], "max_new_tokens": args.max_new_tokens,
              "server_threads": args.threads or "server default (all cores but one)", "sampled": args.sampled, "top_tokens": args.top_tokens, "server_args": args.server_args,
              "steady_window_s": args.steady or None, "warmup_s": args.warmup if args.steady else None,
              "protocol_us_per_token": round(protocol_cost_us(), 2), "overhead_vs_engine": overhead,
              "paced": paced, "levels": levels}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"concurrency-{hello['model']['name']}-{platform.node()}-{report['date'][:10]}{'-sampled' if args.sampled else ''}{'-steady' if args.steady else ''}{'-' + args.tag if args.tag else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    rows = ["| streams | aggregate tok/s | TTFT p50 ms | TTFT p99 ms | gap p50 ms | gap p99 ms | from top / full rows |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    rows += [f"| {r['streams']} | {r['aggregate_tok_s']} | {r['ttft_ms_p50']} | {r['ttft_ms_p99']} | "
             f"{r['gap_ms_p50']} | {r['gap_ms_p99']} | "
             f"{r['sampled'].get('from_top', '–')} / {r['sampled'].get('from_full', '–')} |" for r in levels]
    m = report["machine"]
    text = (f"# Concurrency: {hello['model']['name']} ({hello['model']['architecture']}) on {report['provider']}\n\n"
            f"{report['date']} · {m['host']} · {m['cpu']} · {m['cores']} cores · Python {m['python']}\n\n"
            + (f"Steady state: each stream says again when its reply ends; tokens/s is the server's count over a "
               f"{args.steady:g} s window after {args.warmup:g} s of warm-up. " if args.steady else
               "One burst: every stream says at once; tokens/s runs from the first send to the last done. ")
            + f"{'The server default sampling' if args.sampled else 'Greedy'}, {args.max_new_tokens} new tokens per reply, one AsyncClient, loopback TCP, server ONNX Runtime "
            f"threads: {report['server_threads']}"
            + (f", top tokens {args.top_tokens}" if args.top_tokens is not None else "")
            + (f", serve {args.server_args}" if args.server_args else "") + ". "
            f"Protocol cost per token (encode + parse): {report['protocol_us_per_token']} µs."
            + (f" Overhead per token through the server (1 stream, median gap {overhead['socket_gap_ms_p50']} ms) over "
               f"the engine alone in-process (median step {overhead['engine_step_ms_p50']} ms): "
               f"**{overhead['overhead_ms_per_token']} ms**." if overhead else "")
            + (paced_note(paced) if paced else "")
            + "\n\n" + "\n".join(rows) + "\n")
    (args.out / f"{stem}.md").write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
