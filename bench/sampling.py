"""Host cost of picking a decode step's tokens: whole logits rows against each row's top candidates.

    python bench/sampling.py [--rows 1 8 32 64] [--vocab 49152 50257] [--steps 30] [--top-tokens 64]

For every (vocab, rows), the two ways the scheduler picks sampled tokens run alternately on the
same logits in one process, with the chat defaults (temperature 0.7, top-k 40, top-p 0.9,
repetition penalty 1.15, no-repeat 4-grams):

- ``full``: each row's whole logits row through ``Sampler.next_tokens`` (what every sampled step
  did before ``topk``);
- ``top``: ONNX Runtime's TopK over all rows at once (CPU, one thread), then ``Sampler.pick`` per row,
  and the whole row for a row the candidates cannot decide;
- ``together``: the same TopK, then ``pick.pick_many`` over all rows at once (what the scheduler
  does since it exists), and the whole row where it declines.

All three must pick the same tokens (checked every step). The logits are synthetic (a peaked head over a
normal tail, like a language model's) and histories repeat likely tokens, so penalties bite; the
share of rows the candidates decide on real text is in the server's ``stats`` (``sampled``) and the
concurrency benchmark. Not measured here: the device-to-host copy of whole rows on a GPU, which
``top`` also avoids. Writes ``bench/results/sampling-<machine>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from concurrency import machine  # bench/ is the script's folder

from npctalk.engine.pick import pick_many
from npctalk.engine.sampling import CHAT_DEFAULTS, Sampler
from npctalk.engine.topk import TopK

log = logging.getLogger("bench.sampling")
ROOT = Path(__file__).resolve().parent


def synthetic_logits(rng: np.random.Generator, rows: int, vocab: int) -> np.ndarray:
    """(rows, vocab) float32: a normal tail and 30 tokens per row lifted by 4–10 logits."""
    logits = rng.standard_normal((rows, vocab)).astype(np.float32) * 2
    for row in range(rows):
        logits[row, rng.integers(0, vocab, 30)] += rng.uniform(4, 10, 30).astype(np.float32)
    return logits


def measure(rows: int, vocab: int, steps: int, k: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    topk = TopK(k)
    full = [Sampler(dataclasses.replace(CHAT_DEFAULTS, seed=r)) for r in range(rows)]
    top = [Sampler(dataclasses.replace(CHAT_DEFAULTS, seed=r)) for r in range(rows)]
    together = [Sampler(dataclasses.replace(CHAT_DEFAULTS, seed=r)) for r in range(rows)]
    histories = [rng.integers(0, vocab, 200).tolist() for _ in range(rows)]  # ints, as a request's tokens are
    times: dict[str, list[float]] = {"full": [], "top": [], "together": [], "topk_op": []}
    decided = declined = 0
    for step in range(steps):
        logits = synthetic_logits(rng, rows, vocab)
        for r in range(rows):  # the history holds some of this step's likely tokens
            histories[r] += np.argsort(-logits[r])[: 1 + step % 4].tolist()
        start = time.perf_counter()
        expected = [int(full[r].next_tokens(logits[r:r + 1], [histories[r]])[0]) for r in range(rows)]
        times["full"].append(time.perf_counter() - start)
        start = time.perf_counter()
        ids, values = topk.of_array(logits)
        times["topk_op"].append(time.perf_counter() - start)
        picked = []
        for r in range(rows):
            token = top[r].pick(ids[r], values[r], histories[r])
            if token is None:
                token = int(top[r].next_tokens(logits[r:r + 1], [histories[r]])[0])
                declined += 1
            else:
                decided += 1
            picked.append(token)
        times["top"].append(time.perf_counter() - start)
        start = time.perf_counter()
        ids, values = topk.of_array(logits)
        batched = pick_many(together, ids, values, histories, [{}] * rows)
        batched = [t if t is not None else int(together[r].next_tokens(logits[r:r + 1], [histories[r]])[0])
                   for r, t in enumerate(batched)]
        times["together"].append(time.perf_counter() - start)
        if picked != expected or batched != expected:
            raise AssertionError(f"step {step}: candidates picked {picked} one by one and {batched} together, "
                                 f"whole rows {expected}")
        for r in range(rows):
            histories[r].append(expected[r])
    median = {name: statistics.median(values) * 1000 for name, values in times.items()}
    return {"rows": rows, "vocab": vocab, "steps": steps, "top_tokens": k,
            "full_ms_per_step": round(median["full"], 3), "top_ms_per_step": round(median["top"], 3),
            "topk_op_ms_per_step": round(median["topk_op"], 3), "together_ms_per_step": round(median["together"], 3),
            "together_us_per_row": round((median["together"] - median["topk_op"]) / rows * 1000, 1),
            "together_vs_top": round(median["top"] / median["together"], 2),
            "full_us_per_row": round(median["full"] / rows * 1000, 1), "top_us_per_row": round(median["top"] / rows * 1000, 1),
            "speedup": round(median["full"] / median["top"], 2), "decided_by_top": decided, "needed_full_row": declined}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 50257],
                        help="vocabulary sizes (SmolLM2: 49152; DialoGPT/GPT-2: 50257)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--top-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    results = []
    for vocab in args.vocab:
        for rows in args.rows:
            result = measure(rows, vocab, args.steps, args.top_tokens)
            log.info("vocab %d, %d rows: whole rows %.2f ms/step, top %d %.2f ms/step (%.1fx), together %.2f ms/step; "
                     "%d/%d rows decided by the candidates", vocab, rows, result["full_ms_per_step"], args.top_tokens,
                     result["top_ms_per_step"], result["speedup"], result["together_ms_per_step"],
                     result["decided_by_top"], result["decided_by_top"] + result["needed_full_row"])
            results.append(result)
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    m = machine()
    report = {"date": date, "machine": m, "options": dataclasses.asdict(CHAT_DEFAULTS), "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"sampling-{platform.node()}-{date[:10]}{'-' + args.tag if args.tag else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    lines = [f"# Picking a step's sampled tokens: whole rows vs top {args.top_tokens} candidates",
             "", f"{date} · {m['host']} · {m['cpu']} · Python {m['python']} · chat defaults, "
             f"synthetic logits, median of {args.steps} steps, same process, alternating; the same tokens checked every step.",
             "", "| vocab | rows | whole rows ms/step | top-k, one by one ms/step (of which TopK) | × whole | "
             "top-k, together ms/step | × one by one | µs/row together (TopK aside) | rows decided by the candidates |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['vocab']} | {r['rows']} | {r['full_ms_per_step']} | {r['top_ms_per_step']} ({r['topk_op_ms_per_step']}) | "
              f"{r['speedup']} | {r['together_ms_per_step']} | {r['together_vs_top']} | {r['together_us_per_row']} | "
              f"{r['decided_by_top']} / {r['decided_by_top'] + r['needed_full_row']} |" for r in results]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
