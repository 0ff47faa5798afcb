"""Time to first token with a ~400-token persona, cold vs warm prefix cache, through the real server;
and the latency cost of reranking N sampled candidates (in-process ``ChatSession``).

    python bench/prefix_cache.py --model BUNDLE [--persona-tokens 400] [--repeats 15] [--candidates 4]

Prefix cache: two ``npctalk serve`` subprocesses on free loopback ports, one with the prefix cache
(default size) and one with ``--prefix-cache-mb 0`` (the peer: every say prefills its whole prompt).
A bench persona is grown until its prefix is ``--persona-tokens`` tokens for this model's tokenizer.
Each say uses a new player id, so no history grows the prompt and every prompt has the same shape:

The three paths are interleaved say by say (both servers run at once), so background load on a
shared machine falls on all three alike.

* ``no cache``  — the peer server, the same NPC every time;
* ``cold``      — the cached server, a new NPC id (same persona) each time: a miss, so the prefix is
                  prefilled alone and stored, then the rest;
* ``warm``      — the cached server, the same NPC every time after one warm-up say: a hit, only the
                  turn's tokens (~20) are prefilled.

TTFT is client-side (send → first token message) and server-side (``done.timings.ttft_ms``);
medians and p90 over ``--repeats`` says, greedy, 8 new tokens.

Reranking: ``ChatSession.say`` wall time per turn (sampled, fixed seeds, ``--rerank-tokens`` new
tokens) with reranking off and with ``--candidates`` candidates for each scoring method; and a
say through the server (candidates batched) to a plain NPC vs the same NPC with reranking.

Writes ``bench/results/prefix-cache-<model>-<machine>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from concurrency import free_endpoint, machine, percentile

from npctalk.client import Client
from npctalk.engine.bundle import load_manifest
from npctalk.engine.chat import ChatSession
from npctalk.engine.slot_model import open_model
from npctalk.engine.npcs import PromptBuilder
from npctalk.engine.persona import Persona
from npctalk.engine.rerank import RerankConfig
from npctalk.engine.sampling import SearchOptions
from npctalk.engine.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent
LINE = "Good morning! What can you tell me about the village today?"
FACTS = [
    "I was born in the mill house by the river, the youngest of five.",
    "My father kept bees and sold honey at the autumn fair.",
    "I keep the village records: births, deaths, debts and the price of grain.",
    "Every spring I walk the boundary stones with the reeve.",
    "I once spent a winter snowed in at the monastery on the pass.",
    "The old well behind the chapel has been dry since the great drought.",
    "I trade letters with a scholar in the capital about the northern ruins.",
    "My cat, Pepper, sleeps on the ledger books and will not be moved.",
    "I distrust the toll collectors who come up the east road each summer.",
    "The chapel bell was recast after lightning cracked it nine years ago.",
    "I keep a jar of dried apple rings for children who visit.",
    "Nobody in the village can read the runes on the standing stone but me.",
]


def bench_persona(tokenizer: Tokenizer, bundle: Path, target: int) -> tuple[Persona, int]:
    """The bench persona grown (facts cycled) until its prefix reaches ``target`` tokens."""
    builder = PromptBuilder(load_manifest(bundle), tokenizer)
    facts: list[str] = []
    while True:
        persona = Persona(name="Ilse", role="the village scribe of Ashford", traits=("precise", "curious", "dry"),
                          speaking_style="Careful, complete sentences.", background=tuple(facts))
        length = len(builder.persona_prefix(persona, "player"))
        if length >= target or len(facts) > 200:
            return persona, length
        facts.append(FACTS[len(facts) % len(FACTS)])


def start_server(bundle: Path, threads: int | None, provider: str, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    endpoint = free_endpoint()
    command = [sys.executable, "-m", "npctalk.engine.cli", "serve", "--model", str(bundle), "--bind", endpoint,
               "--provider", provider, "--memory-db", ":memory:", "--temperature", "0", "--no-repeat-ngram", "0",
               "--repetition-penalty", "1.0", *extra]
    if threads:
        command += ["--threads", str(threads)]
    return subprocess.Popen(command, stderr=subprocess.DEVNULL), endpoint


def timed_say(client: Client, npc: str, player: str) -> tuple[float, float]:
    """(client TTFT ms, server TTFT ms) of one greedy say."""
    sent = time.perf_counter()
    reply = client.say(npc, LINE, player=player, max_new_tokens=8)
    first: float | None = None
    for _ in reply:
        first = first if first is not None else time.perf_counter()
    result = reply.wait()
    end = first if first is not None else time.perf_counter()
    return (end - sent) * 1000, float(result.timings.ttft_ms or 0.0)


def summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    client = [c for c, _ in samples]
    server = [s for _, s in samples]
    return {"client_ttft_ms_p50": round(statistics.median(client), 2), "client_ttft_ms_p90": round(percentile(client, 90), 2),
            "server_ttft_ms_p50": round(statistics.median(server), 2), "server_ttft_ms_p90": round(percentile(server, 90), 2)}


def measure_ttft(bundle: Path, persona: Persona, repeats: int, threads: int | None, provider: str) -> dict[str, Any]:
    """Both servers run at once and the three paths are interleaved say by say, so load from other
    processes on the machine falls on all of them alike."""
    card = persona.to_dict()
    peer, peer_endpoint = start_server(bundle, threads, provider, "--prefix-cache-mb", "0")
    cached, cached_endpoint = start_server(bundle, threads, provider)
    samples: dict[str, list[tuple[float, float]]] = {"no_cache": [], "cold": [], "warm": []}
    try:
        with Client(peer_endpoint, timeout=60.0, retries=30) as plain, \
                Client(cached_endpoint, timeout=60.0, retries=30) as client:
            hello = client.hello()
            plain.upsert_npc("ilse", card)
            client.upsert_npc("ilse", card)
            timed_say(plain, "ilse", "warmup")   # first run of the graph
            timed_say(client, "ilse", "warmup")  # first run of the graph; the miss that fills the cache
            for i in range(repeats):
                samples["no_cache"].append(timed_say(plain, "ilse", f"p{i}"))
                client.upsert_npc(f"ilse-{i}", card)  # a new NPC id: a miss
                samples["cold"].append(timed_say(client, f"ilse-{i}", f"p{i}"))
                samples["warm"].append(timed_say(client, "ilse", f"q{i}"))
            stats = client.stats()["prefix_cache"]
    finally:
        for server in (peer, cached):
            server.terminate()
            server.wait(30)
    return {**{key: summary(values) for key, values in samples.items()}, "prefix_cache_stats": stats,
            "model": hello["model"]}


def measure_server_rerank(bundle: Path, persona: Persona, candidates: int, tokens: int, repeats: int,
                          threads: int | None, provider: str) -> list[dict[str, Any]]:
    """Wall time send → done of a plain and a reranked say through one server (candidates batched),
    interleaved; sampled at temperature 0.8 with a seed per say."""
    server, endpoint = start_server(bundle, threads, provider)
    times: dict[str, list[float]] = {"off": [], "both": []}
    try:
        with Client(endpoint, timeout=60.0, retries=30) as client:
            client.upsert_npc("ilse", persona.to_dict())
            client.upsert_npc("ilse-rr", {**persona.to_dict(), "rerank": {"candidates": candidates, "method": "both"}})
            for i in range(repeats + 1):
                for label, npc in (("off", "ilse"), ("both", "ilse-rr")):
                    start = time.perf_counter()
                    client.say(npc, LINE, player=f"r{i}", max_new_tokens=tokens, temperature=0.8, seed=i).wait()
                    if i:  # the first round warms both up
                        times[label].append((time.perf_counter() - start) * 1000)
    finally:
        server.terminate()
        server.wait(30)
    base = statistics.median(times["off"])
    return [{"rerank": label, "candidates": 1 if label == "off" else candidates,
             "say_ms_p50": round(statistics.median(v), 1), "say_ms_p90": round(percentile(v, 90), 1),
             "vs_off": round(statistics.median(v) / base, 2)} for label, v in times.items()]


def measure_rerank(bundle: Path, persona: Persona, candidates: int, tokens: int, turns: int, provider: str,
                   threads: int | None) -> list[dict[str, Any]]:
    model = open_model(bundle, provider=provider, intra_op_threads=threads)  # type: ignore[arg-type]  # a slots bundle: SlotModel
    options = SearchOptions(max_new_tokens=tokens, do_sample=True, temperature=0.8, top_k=40, top_p=0.95,
                            repetition_penalty=1.15, no_repeat_ngram_size=4, seed=1)
    rows = []
    settings: list[tuple[str, RerankConfig]] = [("off", RerankConfig())]
    settings += [(method, RerankConfig(candidates=candidates, method=method))  # type: ignore[arg-type]
                 for method in ("overlap", "likelihood", "both")]
    lines = ["Who are you?", "What do you do all day?", "Tell me something about the village.", "Where were you born?"]
    for label, config in settings:
        session = ChatSession(model, persona, options, rerank=config)
        list(session.say("Hello."))  # warm-up turn
        times = []
        for i in range(turns):
            session.history = []
            start = time.perf_counter()
            list(session.say(lines[i % len(lines)]))
            times.append((time.perf_counter() - start) * 1000)
        rows.append({"rerank": label, "candidates": config.candidates, "turn_ms_p50": round(statistics.median(times), 1),
                     "turn_ms_p90": round(percentile(times, 90), 1)})
    base = rows[0]["turn_ms_p50"]
    for row in rows:
        row["vs_off"] = round(row["turn_ms_p50"] / base, 2)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model bundle folder")
    parser.add_argument("--persona-tokens", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--rerank-tokens", type=int, default=32)
    parser.add_argument("--rerank-turns", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
    parser.add_argument("--provider", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args()

    manifest = load_manifest(args.model)
    tokenizer = Tokenizer.from_file(args.model / manifest.tokenizer_file)
    persona, prefix_tokens = bench_persona(tokenizer, args.model, args.persona_tokens)
    ttft = measure_ttft(args.model, persona, args.repeats, args.threads, args.provider)
    rerank = measure_rerank(args.model, persona, args.candidates, args.rerank_tokens, args.rerank_turns,
                            args.provider, args.threads)
    server_rerank = measure_server_rerank(args.model, persona, args.candidates, args.rerank_tokens,
                                          args.rerank_turns, args.threads, args.provider)
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    speedup = ttft["no_cache"]["server_ttft_ms_p50"] / max(ttft["warm"]["server_ttft_ms_p50"], 1e-9)
    report = {"date": date, "machine": machine(), "model": ttft["model"], "persona_prefix_tokens": prefix_tokens,
              "repeats": args.repeats, "threads": args.threads or "server default (all cores but one)", "ttft": ttft,
              "warm_vs_no_cache_server_ttft_speedup": round(speedup, 2), "rerank": rerank,
              "server_rerank": server_rerank, "rerank_new_tokens": args.rerank_tokens}
    args.out.mkdir(parents=True, exist_ok=True)
    name = ttft["model"]["name"]
    stem = f"prefix-cache-{name}-{platform.node()}-{date[:10]}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    m = report["machine"]
    rows = ["| path | client TTFT p50 ms | p90 | server TTFT p50 ms | p90 |", "|---|---:|---:|---:|---:|"]
    for key in ("no_cache", "cold", "warm"):
        r = ttft[key]
        rows.append(f"| {key.replace('_', ' ')} | {r['client_ttft_ms_p50']} | {r['client_ttft_ms_p90']} | "
                    f"{r['server_ttft_ms_p50']} | {r['server_ttft_ms_p90']} |")
    rr = ["| rerank | candidates | turn p50 ms | p90 | × off |", "|---|---:|---:|---:|---:|"]
    rr += [f"| {r['rerank']} | {r['candidates']} | {r['turn_ms_p50']} | {r['turn_ms_p90']} | {r['vs_off']} |"
           for r in rerank]
    sr = ["| rerank | candidates | say p50 ms | p90 | × off |", "|---|---:|---:|---:|---:|"]
    sr += [f"| {r['rerank']} | {r['candidates']} | {r['say_ms_p50']} | {r['say_ms_p90']} | {r['vs_off']} |"
           for r in server_rerank]
    text = (f"# Prefix cache and reranking: {name} ({ttft['model']['architecture']}) on {ttft['model']['provider']}\n\n"
            f"{date} · {m['host']} · {m['cpu']} · {m['cores']} cores · Python {m['python']} · "
            f"ONNX Runtime threads: {report['threads']}\n\n"
            f"## Time to first token, persona prefix of {prefix_tokens} tokens\n\n"
            f"Greedy, 8 new tokens, {args.repeats} says per path, a new player each say (no history). "
            f"`no cache` is a peer server with `--prefix-cache-mb 0` measured in the same run.\n\n"
            + "\n".join(rows) + f"\n\nWarm vs no cache (server TTFT p50): **{report['warm_vs_no_cache_server_ttft_speedup']}×** "
            f"faster. Cache after the run: {ttft['prefix_cache_stats']}.\n\n"
            f"## Reranking cost (in-process ChatSession, {args.rerank_tokens} new tokens, sampled)\n\n"
            "Candidates are generated one after another, then scored.\n\n"
            + "\n".join(rr) + "\n\n"
            f"## Reranking cost through the server (send → done, {args.rerank_tokens} new tokens, sampled)\n\n"
            "The candidates decode together as rows of one batch; scoring runs in the engine loop.\n\n"
            + "\n".join(sr) + "\n")
    (args.out / f"{stem}.md").write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
