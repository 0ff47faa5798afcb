"""What the single-bundle benchmarks share: the bundle argument, the results files (kv.py, threads.py) and
timed greedy decode steps (kv.py, concurrency.py)."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=None, help="bundle to run (default: the default bundle)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="a sentence for the report (e.g. what else ran on the machine)")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, set up logging, and resolve ``--bundle`` (the default bundle unless given); exits if absent."""
    from npctalk.engine.paths import default_bundle_path

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.bundle = args.bundle or default_bundle_path()
    if not (args.bundle / "manifest.json").exists():
        parser.error(f"no bundle at {args.bundle}; build it with `npctalk export-onnx default` or pass --bundle")
    return args


def write(args: argparse.Namespace, kind: str, report: dict[str, Any], markdown: str) -> Path:
    """``<out>/<kind>-<model>-<dtype>-<host>-<date>.{json,md}``; returns the stem's path."""
    parts = [kind, report["model"].lower(), report["dtype"], platform.node(), report["date"][:10]]
    return write_files(args.out, parts, report, markdown)


def write_files(out: Path, parts: list[str], report: dict[str, Any], markdown: str) -> Path:
    """``<out>/<parts joined by '-'>.{json,md}`` (empty parts left out); returns the stem's path."""
    stem = out / "-".join(part for part in parts if part)
    out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown, encoding="utf-8")
    logging.getLogger(f"bench.{parts[0]}").info("wrote %s.{json,md}", stem)
    return stem


def decode_steps_ms(model: Any, context: int, steps: int, warmup: int = 0) -> list[float]:
    """Milliseconds of each of ``steps`` greedy single-token decode steps (batch 1), after a prefill of
    ``context`` random token ids and ``warmup`` untimed steps."""
    import numpy as np

    ids = np.random.default_rng(0).integers(100, model.manifest.vocab_size, (1, max(1, context)))
    cache = model.new_cache()
    token = int(model.forward(ids, cache)[0].argmax())
    for _ in range(warmup):
        token = int(model.forward(np.array([[token]]), cache)[0].argmax())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        token = int(model.forward(np.array([[token]]), cache)[0].argmax())
        times.append((time.perf_counter() - start) * 1000)
    return times
