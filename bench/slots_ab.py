"""Two slots-layout bundles of the same weights, decoded in turn in one process: which graph is faster.

    python -m bench.slots_ab --a OLD_BUNDLE --b NEW_BUNDLE [--streams 1 8] [--rounds 5] [--device cpu|cuda]

For a graph change (fewer nodes, a fused kernel) the question is the ratio on one machine at one
moment, so the two bundles run alternately (A B, B A, ...) over ``--rounds`` rounds, each round a
``--prompt-tokens`` prompt per stream prefilled, then ``--steps`` greedy decode steps of all
streams through ``SlotDecoder`` (a CUDA graph on the GPU). Per stream count: the median ms per
step of each bundle, b/a, every round's times, each graph's node count, and the share of greedy
tokens on which the two agree (1.0 when the change is exact up to float rounding).
Writes ``bench/results/slots-ab-<model>-<device>-<host>-<date>[-tag].{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from bench.bundle_run import write_files

import numpy as np

log = logging.getLogger("bench.slots_ab")
RESULTS = Path(__file__).resolve().parent / "results"


def node_count(bundle: Path) -> int:
    import onnx

    from npctalk.engine.bundle import load_manifest

    model = onnx.load(str(bundle / load_manifest(bundle).model_file), load_external_data=False)
    return len(model.graph.node)


def measure(a: Path, b: Path, streams: int, args: argparse.Namespace) -> dict[str, Any]:
    """Alternate the two bundles ``args.rounds`` times at ``streams`` streams; medians, ratio, agreement."""
    from npctalk.engine.slots import SlotDecoder

    capacity = args.prompt_tokens + args.steps + 8
    decoders = {name: SlotDecoder(path, slots=streams, capacity=capacity, provider=args.device,
                                  intra_op_threads=args.threads) for name, path in (("a", a), ("b", b))}
    vocab = decoders["a"].manifest.vocab_size
    prompts = np.random.default_rng(0).integers(10, vocab, size=(streams, args.prompt_tokens))
    times: dict[str, list[float]] = {"a": [], "b": []}
    tokens: dict[str, np.ndarray] = {}

    def run(name: str) -> None:
        decoder = decoders[name]
        for slot in range(streams):
            decoder.release(slot)
        step = np.array([decoder.prefill(slot, prompt) for slot, prompt in enumerate(prompts)], dtype=np.int64)
        seen = [step]
        start = time.perf_counter()
        for _ in range(args.steps):
            step = decoder.step(step)
            seen.append(step)
        times[name].append((time.perf_counter() - start) / args.steps * 1000)
        tokens[name] = np.stack(seen)

    for name in ("a", "b"):  # warm-up: allocations and CUDA graph captures outside the timing
        run(name)
        times[name].clear()
    for round_ in range(args.rounds):
        for name in (("a", "b") if round_ % 2 == 0 else ("b", "a")):
            run(name)
        log.info("%d stream(s), round %d: a %.3f ms, b %.3f ms a step", streams, round_ + 1, times["a"][-1], times["b"][-1])
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"streams": streams, "a_ms": round(median["a"], 3), "b_ms": round(median["b"], 3),
            "a_over_b": round(median["a"] / median["b"], 3),
            "rounds_ms": {name: [round(t, 3) for t in values] for name, values in times.items()},
            "token_agreement": round(float((tokens["a"] == tokens["b"]).mean()), 4),
            "cuda_graph": {name: d.cuda_graph for name, d in decoders.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slots_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="the baseline slots bundle")
    parser.add_argument("--b", type=Path, required=True, help="the changed slots bundle (same weights)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps a round")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: ONNX Runtime's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="")
    parser.add_argument("--note", default="", help="a sentence for the report: what a and b are")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from npctalk.engine.bundle import load_manifest

    rows = [measure(args.a, args.b, n, args) for n in args.streams]
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    manifest = load_manifest(args.a)
    report = {"date": date, "host": platform.node(), "processor": platform.processor() or platform.machine(),
              "device": args.device, "model": manifest.name, "dtype": manifest.dtype, "note": args.note,
              "a": str(args.a), "b": str(args.b), "nodes": {"a": node_count(args.a), "b": node_count(args.b)},
              "settings": {"rounds": args.rounds, "steps": args.steps, "prompt_tokens": args.prompt_tokens,
                           "threads": args.threads}, "rows": rows}
    lines = [f"# Slots graphs A/B: {manifest.name} {manifest.dtype} on {args.device}", "",
             f"{date} · {report['host']} · a: `{args.a.name}` ({report['nodes']['a']} nodes) · "
             f"b: `{args.b.name}` ({report['nodes']['b']} nodes)", "",
             f"{args.prompt_tokens}-token prompts, {args.steps} greedy steps a round, {args.rounds} rounds alternating "
             "a/b in one process; medians.", ""]
    if args.note:
        lines += [f"**Note:** {args.note}", ""]
    lines += ["| streams | a ms/step | b ms/step | a / b | token agreement |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['streams']} | {r['a_ms']} | {r['b_ms']} | {r['a_over_b']} | {r['token_agreement']} |" for r in rows]
    write_files(args.out, ["slots-ab", manifest.name.lower(), manifest.dtype, args.device,
                                            report["host"], date[:10], args.tag], report, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
