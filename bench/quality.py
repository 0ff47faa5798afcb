"""Quantization quality: perplexity of one model's fp32/fp16/int8/int4 bundles on the held-out text.

    python -m bench.quality [--source default] [--dtypes fp32 fp16 int8 int4] [--sweep]

Each dtype is exported with ``export_bundle`` (validated like any export) into ``--work`` (a
temporary folder unless given), then scored by ``npctalk.engine.perplexity`` on
``data/heldout/npc_heldout.txt`` (sliding window, ``--window``/``--stride`` tokens). ``--sweep``
also scores int4 variants (block size, symmetry, which layers get 8 bits) made from the fp32
bundle with ``optimize.to_int4``'s overrides: the measurements behind optimize.py's int4 defaults.
Writes ``bench/results/quality-<model>-<host>-<date>.{json,md}``; the target is every quantized
dtype within 5% of fp32.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.quality")
ROOT = Path(__file__).resolve().parent
HELDOUT = ROOT.parent / "data" / "heldout" / "npc_heldout.txt"
TARGET = 0.05  # relative perplexity increase allowed for quantized bundles

DOWN_AND_HEAD = re.compile(r"/mlp/(down_proj|c_proj)/|^/lm_head/")
# name → to_int4 overrides; the int4 row above is optimize.py's default (weights already on a Q4_1 /
# Q8_0 grid, as from the default GGUF, stored exactly; anything else block 32, asymmetric, LM head +
# MLP down projections 8-bit). The re-quantized variants ignore the grid (``exact_grid=False``).
SWEEP: dict[str, dict[str, Any]] = {
    "exact grid, accuracy level 0 (float activations)": {"accuracy_level": 0},
    "re-quantized: block 32, asymmetric, head + down 8-bit": {"exact_grid": False},
    "re-quantized: block 32, asymmetric, all 4-bit": {"exact_grid": False, "sensitive": None},
    "re-quantized: block 16, asymmetric, all 4-bit": {"exact_grid": False, "sensitive": None, "block_size": 16},
    "re-quantized: block 32, symmetric, head + down 8-bit": {"exact_grid": False, "symmetric": True},
    "re-quantized: block 32, asymmetric, head + down fp32": {"exact_grid": False, "sensitive": DOWN_AND_HEAD,
                                                              "sensitive_bits": None},
}


def score(bundle: Path, text: str, args: argparse.Namespace) -> dict[str, Any]:
    from npctalk.engine.model import Model
    from npctalk.engine.perplexity import perplexity

    model = Model(bundle, provider="cpu", intra_op_threads=args.threads)
    start = time.perf_counter()
    result = perplexity(model, text, window=args.window, stride=args.stride)
    size = sum(p.stat().st_size for p in bundle.glob("model.onnx*"))
    log.info("%s: perplexity %.3f (%d tokens, %.0f s)", bundle.name, result.perplexity, result.tokens_scored,
             time.perf_counter() - start)
    return {"perplexity": round(result.perplexity, 4), "mean_nll": round(result.mean_nll, 5),
            "tokens_scored": result.tokens_scored, "window": result.window, "stride": result.stride,
            "model_mb": round(size / 1e6, 1)}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from npctalk.engine.bundle import load_manifest
    from npctalk.export.api import ExportOptions, export_bundle
    from npctalk.export.optimize import to_int4

    text = HELDOUT.read_text(encoding="utf-8")
    rows: list[dict[str, Any]] = []
    bundles: dict[str, Path] = {}
    for dtype in args.dtypes:
        fields: dict[str, Any] = {"dtype": dtype, "graph": args.graph}
        bundles[dtype] = export_bundle(args.source, work / f"{args.graph}-{dtype}", ExportOptions(**fields))
        report = json.loads((bundles[dtype] / "validation.json").read_text(encoding="utf-8"))
        rows.append({"dtype": dtype, **score(bundles[dtype], text, args), "top1_agreement": report.get("top1_agreement")})
    name = load_manifest(next(iter(bundles.values()))).name
    fp32 = next((r["perplexity"] for r in rows if r["dtype"] == "fp32"), None)
    for row in rows:
        row["vs_fp32"] = round(row["perplexity"] / fp32 - 1, 4) if fp32 else None
    sweep: list[dict[str, Any]] = []
    if args.sweep and "fp32" in bundles:
        for label, overrides in SWEEP.items():
            if args.sweep_match and not re.search(args.sweep_match, label):
                continue
            variant = work / "sweep"
            shutil.rmtree(variant, ignore_errors=True)
            shutil.copytree(bundles["fp32"], variant)
            to_int4(variant / "model.onnx", **overrides)
            row = {"variant": label, **score(variant, text, args)}
            row["vs_fp32"] = round(row["perplexity"] / fp32 - 1, 4) if fp32 else None
            sweep.append(row)
        shutil.rmtree(work / "sweep", ignore_errors=True)
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "model": name, "source": str(args.source), "graph": args.graph, "text": str(HELDOUT.relative_to(ROOT.parent)),
            "target_vs_fp32": TARGET, "rows": rows, "int4_sweep": sweep}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    return info


def _fraction(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown(report: dict[str, Any], note: str) -> str:
    def pct(value: float | None) -> str:
        return "—" if value is None else f"{value * 100:+.1f}%"

    first = report["rows"][0] if report["rows"] else {}
    m = report["machine"]
    lines = [f"# Quantization quality: {report['model']} ({report['graph']} graph)", "",
             f"{report['date']} · {m['host']} · {m['cpu']} · {m['cores']} cores", "",
             f"Perplexity on `{report['text']}` (tokens scored: {first.get('tokens_scored')}, window "
             f"{first.get('window')}, stride {first.get('stride')}); target: quantized within "
             f"{report['target_vs_fp32'] * 100:.0f}% of fp32.", ""]
    if note:
        lines += [f"**Note:** {note}", ""]
    lines += ["| dtype | perplexity | vs fp32 | within target | top-1 agreement (validation) | model MB |",
              "|---|---:|---:|---|---:|---:|"]
    for r in report["rows"]:
        ok = "—" if r["vs_fp32"] is None or r["dtype"] == "fp32" else ("yes" if r["vs_fp32"] <= TARGET else "**no**")
        lines.append(f"| {r['dtype']} | {r['perplexity']:.3f} | {pct(r['vs_fp32'])} | {ok} | "
                     f"{_fraction(r['top1_agreement'])} | {r['model_mb']} |")
    if report["int4_sweep"]:
        lines += ["", "int4 variants (from the fp32 bundle, `optimize.to_int4` overrides):", "",
                  "| variant | perplexity | vs fp32 | model MB |", "|---|---:|---:|---:|"]
        lines += [f"| {r['variant']} | {r['perplexity']:.3f} | {pct(r['vs_fp32'])} | {r['model_mb']} |"
                  for r in report["int4_sweep"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="default", help="model folder, hub id or 'default' (SmolLM2-135M-Instruct)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "fp16", "int8", "int4"])
    parser.add_argument("--graph", default="lean", help="graph builder (lean | optimum)")
    parser.add_argument("--sweep", action="store_true", help="also score int4 variants (needs fp32 in --dtypes)")
    parser.add_argument("--sweep-match", default=None, help="only the sweep variants whose label matches this regex")
    parser.add_argument("--window", type=int, default=None, help="tokens per window (default: min(1024, context))")
    parser.add_argument("--stride", type=int, default=512, help="tokens scored per window")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None, help="where bundles are built (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("transformers", "optimum", "onnxruntime", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with tempfile.TemporaryDirectory(prefix="npctalk-quality-") as tmp:
        report = run(args, args.work or Path(tmp))
    slug = re.sub(r"[^a-z0-9.]+", "-", report["model"].lower()).strip("-")
    stem = f"quality-{slug}-{args.graph}-{report['machine']['host']}-{report['date'][:10]}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    text = markdown(report, args.note)
    (args.out / f"{stem}.md").write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
