"""A long prompt joins while another reply streams: the running reply's inter-token gaps and ping
latency, chunked prefill against whole-prompt prefill (``--prefill-chunk 0``), through the real server.

    python bench/long_prompt.py --model BUNDLE [--chunks 0 32 64 128 256] [--persona-tokens 400] [--trials 3]

One ``npctalk serve`` subprocess per ``--chunks`` value, all running at once; the trials are
interleaved setting by setting, so load from other processes on the machine falls on all alike.
A trial, on raw DEALER sockets polled by one thread (every message timestamped on arrival):

1. reply A starts (a short persona, greedy, runs long) and streams ``WARM_TOKENS`` tokens;
2. say B is sent to a new NPC whose persona prefix is ``--persona-tokens`` tokens (a cold prefix
   cache: the whole ~400-token prompt must be prefilled, as on a first turn or after ``npc.upsert``);
3. A streams ``TAIL_TOKENS`` more tokens after B's first token, then is cancelled.

Meanwhile a second socket sends a ``ping`` every ``PING_EVERY_S`` (one outstanding at a time).
Reported per setting, over all trials: A's inter-token gaps that overlap B's prefill (send of B →
B's first token; p50/p99/max) beside A's gap before B was sent (p50), ping round trips that overlap
it (p50/p99/max), and B's time to first token (client side, median). Writes
``bench/results/concurrency-long-prompt-<model>-<machine>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import zmq
from concurrency import machine, percentile
from prefix_cache import bench_persona, start_server

from npctalk.client import Client
from npctalk.engine import protocol
from npctalk.engine.bundle import load_manifest
from npctalk.engine.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent
WARM_TOKENS = 8        # A's tokens before B is sent (its decode is steady by then)
TAIL_TOKENS = 8        # A's tokens after B's first token
PING_EVERY_S = 0.01    # one ping per 10 ms while a trial runs
TRIAL_TIMEOUT_S = 120.0
RUNNING = {"name": "Mira", "role": "a herbalist"}
_ids = itertools.count()


class Trial:
    """One trial on one server: a stream socket (A and B) and a ping socket, both polled here."""

    def __init__(self, context: zmq.Context, endpoint: str) -> None:
        self.stream = context.socket(zmq.DEALER)
        self.pinger = context.socket(zmq.DEALER)
        for sock in (self.stream, self.pinger):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.stream, zmq.POLLIN)
        self.poller.register(self.pinger, zmq.POLLIN)
        self.arrivals: dict[str, list[float]] = {}        # request id → token arrival times
        self.done: dict[str, dict[str, Any]] = {}          # request id → its terminal message
        self.pings: list[tuple[float, float]] = []         # (sent, answered)
        self._ping_sent: float | None = None
        self._next_ping = 0.0

    def send(self, **message: Any) -> str:
        rid = f"r{next(_ids)}"
        self.stream.send(protocol.encode({"v": 1, "id": rid, **message}))
        return rid

    def pump(self, until: Any) -> None:
        """Read both sockets and keep pinging until ``until()`` holds."""
        deadline = time.perf_counter() + TRIAL_TIMEOUT_S
        while not until():
            now = time.perf_counter()
            if now > deadline:
                raise TimeoutError("A trial did not finish in time; is the server running?")
            if self._ping_sent is None and now >= self._next_ping:
                self._ping_sent = now
                self.pinger.send(protocol.encode({"v": 1, "id": f"p{next(_ids)}", "op": "ping"}))
            for sock, _ in self.poller.poll(timeout=2):
                message = protocol.parse_reply(sock.recv())
                arrived = time.perf_counter()
                if sock is self.pinger:
                    assert self._ping_sent is not None
                    self.pings.append((self._ping_sent, arrived))
                    self._ping_sent, self._next_ping = None, arrived + PING_EVERY_S
                elif message["type"] == "token":
                    self.arrivals.setdefault(message["id"], []).append(arrived)
                elif message["type"] in ("done", "error"):
                    self.done[message["id"]] = message

    def close(self) -> None:
        self.stream.close()
        self.pinger.close()


def run_trial(context: zmq.Context, endpoint: str, npc: str, running_tokens: int) -> dict[str, Any]:
    trial = Trial(context, endpoint)
    try:
        a = trial.send(op="say", npc="mira", player=f"a{next(_ids)}", text="Hello! Tell me about herbs.",
                       max_new_tokens=running_tokens)
        trial.pump(lambda: len(trial.arrivals.get(a, [])) >= WARM_TOKENS or a in trial.done)
        sent = time.perf_counter()
        b = trial.send(op="say", npc=npc, player="b", text="Good morning! What can you tell me about the village?",
                       max_new_tokens=8)
        trial.pump(lambda: b in trial.arrivals or b in trial.done)
        first = trial.arrivals[b][0] if b in trial.arrivals else time.perf_counter()
        seen = len(trial.arrivals.get(a, []))
        trial.pump(lambda: len(trial.arrivals.get(a, [])) >= seen + TAIL_TOKENS or a in trial.done)
        outlived = a not in trial.done
        trial.stream.send(protocol.encode({"v": 1, "id": "cancel", "op": "cancel", "target": a}))
        trial.pump(lambda: a in trial.done and b in trial.done)
    finally:
        trial.close()
    times = trial.arrivals.get(a, [])
    gaps = list(zip(times, times[1:]))
    if trial.done[b]["type"] != "done":
        raise RuntimeError(f"The long say failed: {trial.done[b]}")
    return {
        "gaps_during_ms": [(end - start) * 1000 for start, end in gaps if end > sent and start < first],
        "gaps_before_ms": [(end - start) * 1000 for start, end in gaps if end <= sent],
        "pings_during_ms": [(end - start) * 1000 for start, end in trial.pings if end > sent and start < first],
        "ttft_ms": (first - sent) * 1000, "server_ttft_ms": trial.done[b]["timings"]["ttft_ms"],
        "prompt_tokens": trial.done[b]["usage"]["prompt_tokens"], "running_outlived_prefill": outlived,
    }


def summarize(chunk: int, trials: list[dict[str, Any]]) -> dict[str, Any]:
    during = [g for t in trials for g in t["gaps_during_ms"]]
    before = [g for t in trials for g in t["gaps_before_ms"]]
    pings = [p for t in trials for p in t["pings_during_ms"]]

    def r(value: float) -> float:
        return round(value, 1)

    return {
        "prefill_chunk": chunk, "trials": len(trials),
        "prompt_tokens": sorted({t["prompt_tokens"] for t in trials}),
        "gap_before_ms_p50": r(percentile(before, 50)),
        "gap_ms_p50": r(percentile(during, 50)), "gap_ms_p99": r(percentile(during, 99)), "gap_ms_max": r(max(during)),
        "ping_ms_p50": r(percentile(pings, 50)), "ping_ms_p99": r(percentile(pings, 99)), "ping_ms_max": r(max(pings)),
        "pings": len(pings), "ttft_ms_p50": r(statistics.median(t["ttft_ms"] for t in trials)),
        "server_ttft_ms_p50": r(statistics.median(t["server_ttft_ms"] for t in trials)),
        "running_outlived_prefill": all(t["running_outlived_prefill"] for t in trials),
    }


def measure(bundle: Path, chunks: list[int], persona_tokens: int, trials: int, threads: int | None,
            provider: str) -> dict[str, Any]:
    tokenizer = Tokenizer.from_file(bundle / load_manifest(bundle).tokenizer_file)
    persona, prefix_tokens = bench_persona(tokenizer, bundle, persona_tokens)
    card = persona.to_dict()
    servers = {c: start_server(bundle, threads, provider, "--prefill-chunk", str(c), "--max-new-tokens", "900")
               for c in chunks}
    results: dict[int, list[dict[str, Any]]] = {c: [] for c in chunks}
    context = zmq.Context()
    try:
        for chunk, (_, endpoint) in servers.items():
            with Client(endpoint, timeout=60.0, retries=30) as client:  # Lazy Pirate retries while it starts
                hello = client.hello()
                client.upsert_npc("mira", RUNNING)
                client.upsert_npc("warmup", card)
            running_tokens = min(900, hello["model"]["max_context"] // 2)  # A outlasts B's prefill, fits the context
            run_trial(context, endpoint, "warmup", running_tokens)  # first runs of the graph's shapes
        for index in range(trials):
            for chunk, (_, endpoint) in servers.items():
                npc = f"long-{index}"  # a new NPC id: its persona prefix is not cached
                with Client(endpoint, timeout=60.0) as client:
                    client.upsert_npc(npc, card)
                results[chunk].append(run_trial(context, endpoint, npc, running_tokens))
    finally:
        context.term()
        for process, _ in servers.values():
            process.terminate()
            process.wait(30)
    return {"model": hello["model"], "persona_prefix_tokens": prefix_tokens,
            "settings": [summarize(c, results[c]) for c in chunks], "raw": {str(c): results[c] for c in chunks}}


def markdown(report: dict[str, Any]) -> str:
    m, model = report["machine"], report["model"]
    rows = ["| prefill chunk | A gap before p50 ms | A gap p50 ms | p99 | max | ping p50 ms | p99 | max | "
            "B TTFT p50 ms | max gap: whole ÷ this |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    whole = next((s for s in report["settings"] if s["prefill_chunk"] == 0), None)
    for s in report["settings"]:
        ratio = f"{whole['gap_ms_max'] / s['gap_ms_max']:.1f}×" if whole and s is not whole else "—"
        rows.append(f"| {s['prefill_chunk'] or 'whole (0)'} | {s['gap_before_ms_p50']} | {s['gap_ms_p50']} | "
                    f"{s['gap_ms_p99']} | {s['gap_ms_max']} | {s['ping_ms_p50']} | {s['ping_ms_p99']} | "
                    f"{s['ping_ms_max']} | {s['ttft_ms_p50']} | {ratio} |")
    return (f"# A long prompt joins: {model['name']} ({model['architecture']}) on {model['provider']}\n\n"
            f"{report['date']} · {m['host']} · {m['cpu']} · {m['cores']} cores · Python {m['python']} · "
            f"ONNX Runtime threads: {report['server_threads']} · load average at start {report['load_start']}, "
            f"at end {report['load_end']} (other jobs share this VM)\n\n"
            f"Reply A streams (greedy) while say B joins with a cold {report['persona_prefix_tokens']}-token persona "
            f"prefix (prompt {report['settings'][0]['prompt_tokens']} tokens); {report['trials']} trials per setting, "
            f"interleaved across the servers, all started in the same run. A gap: time between two of A's tokens, "
            f"over the gaps overlapping B's prefill (B sent → B's first token); ping: round trip of pings sent every "
            f"{PING_EVERY_S * 1000:.0f} ms on another socket over the same window. `whole (0)` is "
            f"`--prefill-chunk 0`, the peer.\n\n" + "\n".join(rows) + "\n"
            + (f"\n{report['note']}\n" if report.get("note") else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model bundle folder")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 32, 64, 128, 256])
    parser.add_argument("--persona-tokens", type=int, default=400)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="server ONNX Runtime threads")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--note", default="", help="a sentence for the report (e.g. what else ran on the machine)")
    args = parser.parse_args()

    load_start = [round(x, 2) for x in os.getloadavg()]
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "server_threads": args.threads or "server default (all cores but one)", "trials": args.trials, "load_start": load_start,
              "note": args.note}
    report |= measure(args.model, args.chunks, args.persona_tokens, args.trials, args.threads, args.provider)
    report["load_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"concurrency-long-prompt-{report['model']['name']}-{platform.node()}-{report['date'][:10]}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    text = markdown(report)
    (args.out / f"{stem}.md").write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
