"""In-place KV cache vs the plain path: decode step time as the context grows, same bundle, same run.

    python -m bench.kv [--bundle PATH] [--contexts 64 512 1024 2048] [--steps 32] [--repeats 3]

For each context length the cache is filled with a prefill of that many tokens, then ``--steps``
single-token decode steps are timed, with ``Model(inplace_kv=True)`` (GroupQueryAttention writes into
the cache's own buffers) and ``inplace_kv=False`` (ONNX Runtime returns a grown copy of every layer's
cache each step), interleaved, best of ``--repeats``. Writes
``bench/results/kv-<model>-<dtype>-<host>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import statistics
from typing import Any

from bench.bundle_run import add_common, decode_steps_ms, parse, write

log = logging.getLogger("bench.kv")


def step_ms(model: Any, context: int, steps: int) -> float:
    """Mean milliseconds per decode step after a ``context``-token prefill (greedy, batch 1; the first
    decode step is a warm-up)."""
    return statistics.fmean(decode_steps_ms(model, context, steps, warmup=1))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from npctalk.engine.model import Model

    models = {mode: Model(args.bundle, provider="cpu", intra_op_threads=args.threads, inplace_kv=mode == "in place")
              for mode in ("in place", "plain")}
    manifest = models["plain"].manifest
    kv_bytes = 2 * manifest.num_layers * manifest.num_kv_heads * manifest.head_dim * 4   # per position, fp32
    rows = []
    for context in args.contexts:
        best = {mode: float("inf") for mode in models}
        for _ in range(args.repeats):
            for mode, model in models.items():
                best[mode] = min(best[mode], step_ms(model, context, args.steps))
        rows.append({"context": context, "inplace_ms": round(best["in place"], 2), "plain_ms": round(best["plain"], 2),
                     "speedup": round(best["plain"] / best["in place"], 2),
                     "plain_copies_mb_per_step": round(kv_bytes * context / 1e6, 1)})
        log.info("context %d: %s", context, rows[-1])
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"host": platform.node(), "cores": os.cpu_count(), "load_before": os.getloadavg()[0]},
            "model": manifest.name, "dtype": manifest.dtype, "threads": args.threads or "one per core",
            "steps": args.steps, "repeats": args.repeats, "rows": rows}


def markdown(report: dict[str, Any], note: str) -> str:
    m = report["machine"]
    lines = [f"# In-place KV vs plain: {report['model']} ({report['dtype']})", "",
             f"{report['date']} · {m['host']} · {m['cores']} cores · load average before the run {m['load_before']:.2f} · "
             f"threads: {report['threads']}", "",
             f"Mean decode step over {report['steps']} steps after a prefill of the given length, batch 1, best of "
             f"{report['repeats']} interleaved runs. The plain path copies the whole cache once per step (last column).", ""]
    if note:
        lines += [f"**Note:** {note}", ""]
    lines += ["| context | in place ms/step | plain ms/step | plain ÷ in place | cache copied per plain step (MB) |",
              "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['context']} | {r['inplace_ms']} | {r['plain_ms']} | {r['speedup']}× | {r['plain_copies_mb_per_step']} |"
              for r in report["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kv", description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 512, 1024, 2048])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    add_common(parser)
    args = parse(parser, argv)
    report = run(args)
    write(args, "kv", report, markdown(report, args.note))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
