"""Where a decode step's time goes on the GPU: each CUDA kernel's time, from Nsight Compute.

    python -m bench.kernel_times --bundle BUNDLE [--streams 1] [--steps 4] [--out DIR]

On the H100 a batch-1 step of the slot decoder took 50–57 µs per layer for every architecture
(DialoGPT-small/medium/large, SmolLM2-135M; bench/results/decode-nvidia-h100-*-run2), several times
what reading the layer's weights costs. Whether that is the kernels themselves (small matrix-vector
products, attention) or the time between them decides what to change, and only the GPU can say.

Two runs of the same steps on the same bundle (``--streams`` rows, a 64-token prompt each, the CUDA
graph on unless ``--no-graph``):

1. plain: the wall time per decode step (after ``--warmup`` steps);
2. under ``ncu`` (Nsight Compute, on the GPU machine's image), with ``--profile-from-start off``: the
   run opens the profiler around ``--steps`` steps only, and ncu reports ``gpu__time_duration.sum``
   for every kernel they launch (CUDA-graph nodes one by one).

The report: kernels per step, kernel time per step against the wall time per step (the rest is
launch gaps and host work), and the kernels grouped by name with their share.
Writes ``kernel-times-<bundle>-<streams>.{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import glob
import io
import json
import logging
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.kernel_times")
METRIC = "gpu__time_duration.sum"
NCU_GLOBS = ("/opt/nvidia/nsight-compute/*/ncu", "/usr/local/cuda*/bin/ncu", "/usr/local/cuda*/nsight-compute*/ncu")


def find_ncu() -> str | None:
    """The ncu binary: on PATH, else where NVIDIA's installers put it."""
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in NCU_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


def _cudart() -> Any:
    """The CUDA runtime ONNX Runtime loaded (its profiler start/stop are what ncu listens to)."""
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RuntimeError("no CUDA runtime library (libcudart) could be loaded")


def run_steps(bundle: Path, streams: int, warmup: int, steps: int, graph: bool, profile: bool,
              provider: str = "cuda") -> dict[str, Any]:
    """Prefill ``streams`` slots, run ``warmup`` steps, then ``steps`` timed (or profiled) steps."""
    import numpy as np

    import onnxruntime as ort

    if provider == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # the CUDA libraries PyTorch ships, before the session needs them
    from npctalk.engine.slots import SlotDecoder

    decoder = SlotDecoder(bundle, slots=streams, capacity=256, provider=provider, cuda_graph=graph)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    vocab = int(decoder.manifest.vocab_size)
    tokens = np.asarray([decoder.prefill(s, rng.integers(0, vocab, 64)) for s in range(streams)])
    for _ in range(warmup):
        tokens = decoder.step(tokens)
    cudart = _cudart() if profile else None
    if cudart is not None:
        cudart.cudaDeviceSynchronize()
        cudart.cudaProfilerStart()
    start = time.perf_counter()
    for _ in range(steps):
        tokens = decoder.step(tokens)  # each step returns its tokens on the host: the step is done
    wall = time.perf_counter() - start
    if cudart is not None:
        cudart.cudaDeviceSynchronize()
        cudart.cudaProfilerStop()
    return {"steps": steps, "wall_us_per_step": wall / steps * 1e6, "cuda_graph": bool(decoder.cuda_graph),
            "streams": streams, "device": decoder.device}


def parse_ncu_csv(text: str) -> list[tuple[str, float]]:
    """(kernel name, duration in µs) per profiled kernel launch, in launch order, from ``ncu --csv``."""
    start = text.find('"ID"')
    if start < 0:
        return []
    out = []
    for row in csv.DictReader(io.StringIO(text[start:])):
        if row.get("Metric Name") != METRIC:
            continue
        value = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "nsecond").strip().lower()
        scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}.get(unit)
        if scale is None:
            raise ValueError(f"unknown unit {unit!r} for {METRIC}")
        out.append((row["Kernel Name"], value * scale))
    return out


def summarize(launches: list[tuple[str, float]], steps: int, wall_us_per_step: float | None) -> dict[str, Any]:
    """Kernels per step, kernel µs per step, and the kernels grouped by name (largest share first)."""
    if not launches or steps < 1:
        raise ValueError("no kernel launches to summarize")
    by_name: dict[str, list[float]] = defaultdict(list)
    for name, us in launches:
        by_name[name].append(us)
    total = sum(us for _, us in launches)
    groups = [{"kernel": name, "launches_per_step": len(times) / steps, "us_per_step": sum(times) / steps,
               "mean_us": sum(times) / len(times), "share": sum(times) / total}
              for name, times in by_name.items()]
    groups.sort(key=lambda g: -g["us_per_step"])
    summary: dict[str, Any] = {"kernels_per_step": len(launches) / steps, "kernel_us_per_step": total / steps,
                               "groups": groups}
    if wall_us_per_step:
        summary["wall_us_per_step"] = wall_us_per_step
        summary["kernel_share_of_wall"] = total / steps / wall_us_per_step
    return summary


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"# Kernel time per decode step: {meta['bundle']}", "",
             f"{meta['date']} · {meta['machine'].get('gpu', meta['machine']['cpu'])} · {meta['streams']} stream(s), CUDA graph "
             f"{'on' if meta['cuda_graph'] else 'off'}, {meta['steps']} profiled steps after {meta['warmup']} warm-up "
             f"steps · ncu {METRIC}", "", *([f"**Note:** {meta['note']}", ""] if meta.get("note") else []),
             f"- kernels per step: {summary['kernels_per_step']:.1f}",
             f"- kernel time per step: {summary['kernel_us_per_step']:.1f} µs"]
    if "wall_us_per_step" in summary:
        lines += [f"- wall time per step (plain run, same steps): {summary['wall_us_per_step']:.1f} µs; kernels "
                  f"busy {summary['kernel_share_of_wall']:.0%} of it"]
    lines += ["", "| kernel | launches/step | µs/step | mean µs | share |", "|---|---:|---:|---:|---:|"]
    for g in summary["groups"][:40]:
        name = g["kernel"] if len(g["kernel"]) <= 90 else g["kernel"][:87] + "..."
        lines.append(f"| `{name}` | {g['launches_per_step']:.1f} | {g['us_per_step']:.1f} | {g['mean_us']:.2f} | "
                     f"{g['share']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="a slots-layout CUDA bundle")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-graph", dest="graph", action="store_false", help="run the steps without the CUDA graph")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--ncu", default=None, help="path of ncu (default: PATH, then /opt/nvidia/nsight-compute)")
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda", help="cpu: rehearse the runs (tests)")
    parser.add_argument("--child", choices=("plain", "profiled"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    if args.child:
        result = run_steps(args.bundle, args.streams, args.warmup, args.steps, args.graph,
                           args.child == "profiled" and args.provider == "cuda", args.provider)
        print("KERNEL_TIMES " + json.dumps(result), flush=True)
        return 0

    from bench.decode import machine

    ncu = args.ncu or find_ncu()
    if ncu is None:
        log.error("ncu (Nsight Compute) was not found on PATH or under /opt/nvidia/nsight-compute")
        return 2
    child = [sys.executable, "-m", "bench.kernel_times", "--bundle", str(args.bundle), "--streams", str(args.streams),
             "--warmup", str(args.warmup), "--steps", str(args.steps), "--provider", args.provider]
    child += [] if args.graph else ["--no-graph"]
    plain = subprocess.run(child + ["--child", "plain"], capture_output=True, text=True, cwd=ROOT)
    result = _child_result(plain)
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / f"ncu-{args.bundle.name}-{args.streams}.csv"
    log.info("plain run: %.1f µs per step; now the same steps under %s", result["wall_us_per_step"], ncu)
    ncu_args = [ncu, "--profile-from-start", "off", "--metrics", METRIC, "--csv", "--print-units", "base",
                "--print-kernel-base", "function", "--log-file", str(report)]
    _child_result(subprocess.run(ncu_args + child + ["--child", "profiled"], capture_output=True, text=True, cwd=ROOT))
    launches, note = parse_ncu_csv(report.read_text()), ""
    if not launches and args.graph:
        # ncu saw no kernel inside the replayed CUDA graph: the same kernels run one by one without it
        note = "ncu profiled no kernel in the CUDA graph's replays; kernels timed from the same steps without the graph"
        log.warning(note)
        _child_result(subprocess.run(ncu_args + child + ["--no-graph", "--child", "profiled"], capture_output=True,
                                     text=True, cwd=ROOT))
        launches = parse_ncu_csv(report.read_text())
    summary = summarize(launches, args.steps, result["wall_us_per_step"])
    meta = {"bundle": args.bundle.name, "streams": args.streams, "steps": args.steps, "warmup": args.warmup,
            "cuda_graph": result["cuda_graph"], "date": time.strftime("%Y-%m-%d"), "machine": machine(args.provider),
            "note": note}
    stem = args.out / f"kernel-times-{args.bundle.name}-{args.streams}{'' if args.graph else '-nograph'}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, **summary}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(summary, meta))
    print(markdown(summary, meta))
    return 0


def _child_result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    for line in proc.stdout.splitlines():
        if line.startswith("KERNEL_TIMES "):
            return json.loads(line[len("KERNEL_TIMES "):])
    raise SystemExit(f"the decode run failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


if __name__ == "__main__":
    raise SystemExit(main())
