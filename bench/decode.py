"""Decode speed: npctalk bundles against their peers, measured in the same run on the same machine.

    python -m bench.decode [--models dialogpt-small smollm2-135m] [--dtypes fp32 int8 int4] [--streams 1 4 16]
                           [--device cpu|cuda] [--threads N] [--bandwidth-gbs GB/s]

For each architecture (``ARCHITECTURES``: exact configs, random weights, built here; no model hub)
the model is saved as a Hugging Face folder and exported with ``export_bundle`` once per dtype and
graph builder (cached under ``--work``). Each row: a 64-token prompt, then 128 greedy new tokens
(EOS never ends a row early), batch 1 and N concurrent streams (``engine/batch.py``'s
``DecodeBatch``: prompts prefilled one by one as the scheduler admits them, then one forward per
step for all rows). Slots bundles add a ``npctalk-slots-together`` row per N > 1: the same, with
the N prompts read in one ``prefill_many``.

Peers in the same run: Hugging Face ``generate()`` in PyTorch (fp32 on CPU, fp16 on CUDA),
optimum's ``ORTModelForCausalLM`` on the same random model, llama-cpp-python on the default
model's Q4_1 GGUF (CPU, when importable), and the real default bundle when it is built.

Metrics per row: ``ttft_ms`` = start → first new token of every stream (prefill(s) + one step);
``decode_tok_s`` = tokens after the first / their time (aggregate over streams);
``e2e_tok_s`` = all new tokens / the whole time; ``bound_tok_s`` = the memory-bandwidth bound:
streams × bandwidth ÷ fp16 weight bytes (every weight read once per step; KV reads ignored).
Bandwidth: ``--bandwidth-gbs``, else a known GPU's datasheet figure, else (CPU) a large numpy copy.
Writes ``bench/results/decode-<device>-<host>-<date>.{json,md}``. Progress goes through logging.
How each contender is driven and timed lives in ``bench/contenders.py``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .contenders import Settings, release_models, run_hf, run_llama_cpp, run_npctalk, run_optimum, run_slots

log = logging.getLogger("bench.decode")
ROOT = Path(__file__).resolve().parent
GPU_BANDWIDTH_GBS = {"H100": 3350.0, "H200": 4800.0}  # HBM datasheet figures (SXM)
SEED = 0


@dataclass(frozen=True)
class Architecture:
    """An exact model shape: ``family`` gpt2 | llama, ``config`` the transformers config keywords."""

    family: str
    config: dict[str, Any]


ARCHITECTURES: dict[str, Architecture] = {
    "dialogpt-small": Architecture("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)),
    "dialogpt-medium": Architecture("gpt2", dict(n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, n_positions=1024)),
    "dialogpt-large": Architecture("gpt2", dict(n_embd=1280, n_layer=36, n_head=20, vocab_size=50257, n_positions=1024)),
    "smollm2-135m": Architecture("llama", dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
        max_position_embeddings=8192)),
    # Test sizes: the same code paths in seconds.
    "tiny-gpt2": Architecture("gpt2", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=512)),
    "tiny-llama": Architecture("llama", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1000, tie_word_embeddings=True, max_position_embeddings=512)),
}


@dataclass
class Row:
    model: str
    engine: str          # npctalk | hf-pytorch | optimum-ort | llama.cpp
    dtype: str
    streams: int
    ttft_ms: float
    decode_tok_s: float
    e2e_tok_s: float
    bound_tok_s: float | None
    graph: str = ""
    weights: str = "random"   # random | real
    note: str = ""
    ttft_long_ms: float | None = None  # slot decoder at batch 1: first token of a --ttft-prompt-token prompt


# --- building the models ------------------------------------------------------------------------

def build_hf_folder(name: str, work: Path) -> Path:
    """Save the architecture with random weights (seeded) and a small byte-level tokenizer; reuse if present."""
    folder = work / "hf" / name
    if (folder / "config.json").exists():
        return folder
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

    arch = ARCHITECTURES[name]
    log.info("Building %s with random weights (%s)", name, arch.family)
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    text = (ROOT.parent / "data" / "heldout" / "npc_heldout.txt").read_text(encoding="utf-8").splitlines()
    # A few thousand merges (as many as the held-out text allows): prompts of about real length in tokens,
    # so server benchmarks (persona + context) fit the context as they would with the real tokenizer.
    raw.train_from_iterator(text, trainers.BpeTrainer(vocab_size=min(4000, arch.config["vocab_size"]), special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    config_class = GPT2Config if arch.family == "gpt2" else LlamaConfig
    config = config_class(**arch.config, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config).eval()
    partial = folder.with_name(folder.name + ".partial")
    tok.save_pretrained(partial)
    model.save_pretrained(partial)
    partial.rename(folder)
    return folder


def export(hf_folder: Path, work: Path, dtype: str, graph: str, device: str, layout: str = "auto") -> tuple[Path, str]:
    """The bundle (lean graphs on CUDA get the slots layout) and a note on how it was validated.

    On CUDA the export validates against PyTorch on the GPU; if that fails, the same slots-layout
    graph is exported and validated on the CPU instead (the note says so) so the run goes on."""
    from npctalk.export.api import ExportOptions, export_bundle

    options = ExportOptions(dtype=dtype, device=device, graph=graph, layout=layout if graph == "lean" else "auto")
    out = work / "bundles" / f"{hf_folder.name}-{graph}-{dtype}-{device}-{options.resolved_layout}"
    try:
        return export_bundle(hf_folder, out, options), ""
    except Exception as exc:
        if device != "cuda" or graph != "lean":
            raise
        log.warning("Export validated on CUDA failed (%s: %s); exporting the same graph validated on the CPU",
                    type(exc).__name__, str(exc).splitlines()[0][:300])
        out = out.with_name(out.name + "-cpu-validated")
        bundle = export_bundle(hf_folder, out, ExportOptions(dtype=dtype, device="cpu", graph=graph, layout="slots"))
        return bundle, f"validated on the CPU (CUDA validation failed: {type(exc).__name__})"


def is_slots(bundle: Path) -> bool:
    from npctalk.engine.bundle import load_manifest

    return load_manifest(bundle).layout == "slots"


def parameter_count(hf_folder: Path) -> int:
    """All weights, embeddings included (a tied LM head counted once), from the safetensors header."""
    from safetensors import safe_open

    total = 0
    for file in hf_folder.glob("*.safetensors"):
        with safe_open(str(file), "np") as f:
            total += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    return total


# --- machine ------------------------------------------------------------------------------------

def cpu_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Copy bandwidth (read + write bytes / s) of a large numpy copy, best of ``repeats``."""
    src = np.ones(megabytes * 2**20 // 8)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best / 1e9


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cuda_available() -> bool:
    """CUDA usable by both PyTorch and ONNX Runtime."""
    try:
        import torch
    except ImportError:
        return False
    from npctalk.export.validate import cuda_usable

    return bool(torch.cuda.is_available()) and cuda_usable()


def bandwidth(args: argparse.Namespace, info: dict[str, Any]) -> tuple[float, str]:
    if args.bandwidth_gbs:
        return args.bandwidth_gbs, "given"
    if args.device == "cuda":
        known = next((gbs for key, gbs in GPU_BANDWIDTH_GBS.items() if key in info.get("gpu", "")), None)
        if known:
            return known, f"{info['gpu']} datasheet"
        log.warning("Unknown GPU %s: pass --bandwidth-gbs for the bound column", info.get("gpu"))
        return 0.0, "unknown"
    return round(cpu_bandwidth_gbs(), 1), "numpy copy, measured"


# --- the run ------------------------------------------------------------------------------------

def best(measure: Callable[[], tuple[float, float, float]], repeats: int) -> tuple[float, float, float]:
    """The fastest of ``repeats`` runs (by end-to-end rate): the least disturbed by other work."""
    runs = [measure() for _ in range(repeats)]
    ttft, dec, e2e = max(runs, key=lambda r: r[2])
    return round(ttft, 2), round(dec, 1), round(e2e, 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, streams=tuple(args.streams),
                        device=args.device, threads=args.threads, repeats=args.repeats)
    info = machine(args.device)
    gbs, gbs_source = bandwidth(args, info)
    log.info("Bandwidth %.1f GB/s (%s)", gbs, gbs_source)
    rows: list[Row] = []
    skipped: list[str] = []

    def attempt(label: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # a peer that cannot run is reported, not fatal
            log.warning("%s: skipped (%s: %s)", label, type(exc).__name__, exc)
            skipped.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")

    def add(model: str, engine: str, dtype: str, streams: int, params: int | None, measure: Callable[[], tuple[float, float, float]],
            **extra: str) -> None:
        log.info("%s · %s %s · %d stream(s)", model, engine, dtype, streams)
        ttft, dec, e2e = best(measure, settings.repeats)
        bound = round(streams * gbs * 1e9 / (2 * params), 1) if gbs and params else None
        rows.append(Row(model, engine, dtype, streams, ttft, dec, e2e, bound, **extra))
        log.info("  TTFT %.1f ms, decode %.1f tok/s, end to end %.1f tok/s (bound %s)", ttft, dec, e2e, bound)

    def add_slots(model: str, dtype: str, streams: int, params: int | None, bundle: Path, cuda_graph: bool,
                  how: str, together: bool = False) -> None:
        label = "npctalk-slots" if cuda_graph or args.device != "cuda" else "npctalk-slots-nograph"
        label += "-together" if together else ""
        log.info("%s · %s %s · %d stream(s)", model, label, dtype, streams)
        long = args.ttft_prompt if streams == 1 else 0
        runs = [run_slots(bundle, settings, streams, cuda_graph, long, together) for _ in range(settings.repeats)]
        ttft, dec, e2e, details = max(runs, key=lambda r: r[2])
        bound = round(streams * gbs * 1e9 / (2 * params), 1) if gbs and params else None
        graph_note = ("CUDA graph" if details["cuda_graph"] else
                      f"no CUDA graph{': ' + details['fallback'] if details['fallback'] else ''}") if args.device == "cuda" else ""
        note = "; ".join(x for x in (graph_note, f"KV {details['kv_mb']} MB", how) if x)
        rows.append(Row(model, label, dtype, streams, round(ttft, 2), round(dec, 1), round(e2e, 1), bound, graph="lean-slots",
                        note=note, ttft_long_ms=details.get(f"ttft_{long}_ms")))
        log.info("  TTFT %.1f ms, decode %.1f tok/s, end to end %.1f tok/s (bound %s) %s", ttft, dec, e2e, bound, note)

    peer_dtype = "fp16" if args.device == "cuda" else "fp32"
    for name in args.models:
        hf = build_hf_folder(name, args.work)
        params = parameter_count(hf)

        def hf_rows(name: str = name, hf: Path = hf, params: int = params) -> None:
            for n in settings.streams:
                attempt(f"{name} hf-pytorch", lambda n=n: add(name, "hf-pytorch", peer_dtype, n, params,
                                                               lambda: run_hf(hf, settings, n)))
            if args.device == "cuda":
                import torch

                torch.cuda.empty_cache()  # the peer's cached blocks back to the device before ONNX Runtime loads

        if "hf" in args.peers and args.peers_first:  # the baseline first: nothing of ours can disturb it
            hf_rows()
        for graph in args.graphs:
            for dtype in args.dtypes:
                def ours(graph: str = graph, dtype: str = dtype) -> None:
                    bundle, how = export(hf, args.work, dtype, graph, args.device, args.layout)
                    slots = is_slots(bundle)
                    for n in settings.streams:
                        if slots:
                            attempt(f"{name} npctalk-slots {n}", lambda n=n: add_slots(name, dtype, n, params, bundle, True, how))
                            if n > 1:  # the same streams with their prompts read together (prefill_many)
                                attempt(f"{name} npctalk-slots-together {n}",
                                        lambda n=n: add_slots(name, dtype, n, params, bundle, True, how, together=True))
                            if args.device == "cuda" and n == settings.streams[0]:  # the CUDA graph's share, measured
                                attempt(f"{name} npctalk-slots no graph {n}",
                                        lambda n=n: add_slots(name, dtype, n, params, bundle, False, how))
                        if not slots or (n == 1 and args.generic_too):  # the generic engine path (Model, DecodeBatch)
                            attempt(f"{name} npctalk {n}", lambda n=n: add(
                                name, "npctalk", dtype, n, params, lambda: run_npctalk(bundle, settings, n), graph=graph,
                                note=how))
                attempt(f"{name} npctalk {graph} {dtype}", ours)
        release_models()
        if "hf" in args.peers and not args.peers_first:
            hf_rows()
        if "optimum" in args.peers:
            for n in settings.streams:
                attempt(f"{name} optimum-ort", lambda n=n: add(name, "optimum-ort", peer_dtype, n, params,
                                                                lambda: run_optimum(hf, args.work, settings, n)))
        if "llama.cpp" in args.peers and name == "smollm2-135m":
            gguf = default_gguf()
            if args.device != "cpu":
                skipped.append("llama.cpp: CPU peer only")
            elif gguf is None:
                skipped.append("llama.cpp: the default GGUF is not downloaded (run `export-onnx default` once)")
            else:
                # Its worker threads spin while they wait, so on a busy machine it may do better with one.
                for threads in sorted({settings.threads or os.cpu_count() or 1, 1}, reverse=True):
                    attempt("llama.cpp", lambda t=threads: add(
                        name, "llama.cpp", "Q4_1", 1, params, lambda: run_llama_cpp(gguf, settings, t), weights="real",
                        note=f"the default model's GGUF; {t} thread(s)"))
    for bundle in real_bundles(args):
        def real(bundle: Path = bundle) -> None:
            from npctalk.engine.bundle import load_manifest

            manifest = load_manifest(bundle)
            params = _bundle_params(bundle, manifest.dtype)
            for n in settings.streams:
                add(f"{manifest.name} ({bundle.name})", "npctalk", manifest.dtype, n, params,
                    lambda: run_npctalk(bundle, settings, n), graph=manifest.graph, weights="real")
        attempt(f"bundle {bundle}", real)
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": info,
        "settings": {**asdict(settings), "threads": settings.threads or "one per core", "ttft_prompt": args.ttft_prompt},
        "bandwidth_gbs": gbs, "bandwidth_source": gbs_source, "note": args.note,
        "rows": [asdict(r) for r in rows], "skipped": skipped,
    }


def default_gguf() -> Path | None:
    """The default model's Q4_1 GGUF where ``export-onnx default`` extracted it, if it did."""
    from npctalk.engine.paths import downloads_dir
    from npctalk.export.sources import DEFAULT_GGUF_MEMBER

    found = sorted(downloads_dir().glob(f"*/{DEFAULT_GGUF_MEMBER}"))
    return found[0] if found else None


def real_bundles(args: argparse.Namespace) -> list[Path]:
    bundles = list(args.bundle)
    if not args.no_default:
        from npctalk.engine.paths import default_bundle_path

        if (default_bundle_path() / "manifest.json").exists():
            bundles.insert(0, default_bundle_path())
    return bundles


def _bundle_params(bundle: Path, dtype: str) -> int | None:
    """Weights in a float bundle's graph (for the bandwidth bound); None for quantized ones."""
    if dtype not in ("fp32", "fp16"):
        return None
    import onnx

    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    return sum(int(np.prod(i.dims)) for i in graph.initializer if i.data_type in floats and len(i.dims) >= 1)


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    hf = {(r["model"], r["streams"]): r["e2e_tok_s"] for r in report["rows"] if r["engine"] == "hf-pytorch"}
    lines = [f"# Decode: npctalk and peers on {s['device']}", "",
             f"{report['date']} · {m['host']} · {m.get('gpu') or m['cpu']} · {m['cores']} cores · Python {m['python']}", "",
             f"{s['prompt_tokens']}-token prompt, {s['new_tokens']} greedy new tokens per stream (EOS never stops a row), "
             f"threads: {s['threads']}, best of {s['repeats']}. Architectures have random weights unless marked real. "
             f"Bound = streams × {report['bandwidth_gbs']} GB/s ({report['bandwidth_source']}) ÷ fp16 weight bytes.", ""]
    if report["note"]:
        lines += [f"**Note:** {report['note']}", ""]
    long = s.get("ttft_prompt", 0)
    lines += [f"| model | engine | graph | dtype | weights | streams | TTFT ms | TTFT {long}-token prompt ms | decode tok/s | "
              "e2e tok/s | × HF e2e | bound tok/s | note |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        base = hf.get((r["model"], r["streams"]))
        ratio = f"{r['e2e_tok_s'] / base:.2f}" if base else "—"
        lines.append(f"| {r['model']} | {r['engine']} | {r['graph'] or '—'} | {r['dtype']} | {r['weights']} | {r['streams']} | "
                     f"{r['ttft_ms']} | {r.get('ttft_long_ms') or '—'} | {r['decode_tok_s']} | {r['e2e_tok_s']} | {ratio} | "
                     f"{r['bound_tok_s'] or '—'} | {r['note']} |")
    if report["skipped"]:
        lines += ["", "Skipped:", *[f"- {s}" for s in report["skipped"]]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from npctalk.engine.paths import home

    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["dialogpt-small", "smollm2-135m"], choices=sorted(ARCHITECTURES))
    parser.add_argument("--dtypes", nargs="+", default=None, help="npctalk bundles (default: fp32 int8 int4 on CPU, fp16 on CUDA)")
    parser.add_argument("--graphs", nargs="+", default=None, help="graph builders (default: optimum, and lean when available)")
    parser.add_argument("--streams", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--peers", nargs="*", default=["hf", "optimum", "llama.cpp"], choices=["hf", "optimum", "llama.cpp"])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for every contender (default: one per core)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per row; the fastest is kept")
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="memory bandwidth for the bound column (default: H100 3350, H200 4800, CPU measured)")
    parser.add_argument("--bundle", type=Path, nargs="*", default=[], help="extra real bundles to time")
    parser.add_argument("--no-default", action="store_true", help="do not time the real default bundle even if built")
    parser.add_argument("--work", type=Path, default=home() / "bench", help="cache of built models and bundles")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--note", default="", help="a line for the markdown (e.g. 'machine shared with other jobs')")
    parser.add_argument("--ttft-prompt", type=int, default=256,
                        help="slot decoder rows at batch 1 also time the first token of a prompt this long (0: off)")
    parser.add_argument("--peers-first", action="store_true", help="time the HF peer before npctalk's rows")
    parser.add_argument("--tag", default="", help="appended to the result files' names (one run per model, say)")
    parser.add_argument("--layout", choices=["auto", "mask", "slots"], default="auto",
                        help="lean graph layout (auto: slots on CUDA, mask on the CPU); slots bundles run on the slot decoder")
    parser.add_argument("--generic-too", action="store_true",
                        help="with a slots bundle, also time the generic engine path (Model + DecodeBatch) at batch 1")
    args = parser.parse_args(argv)
    if args.prompt_tokens < 1 or args.new_tokens < 2 or min(args.streams) < 1 or args.repeats < 1:
        parser.error("--prompt-tokens >= 1, --new-tokens >= 2, --streams >= 1 and --repeats >= 1 are required")
    args.dtypes = args.dtypes or (["fp16"] if args.device == "cuda" else ["fp32", "int8", "int4"])
    if args.graphs is None:
        from npctalk.engine import bundle

        args.graphs = ["optimum", "lean"] if "lean" in getattr(bundle, "GRAPHS", ()) else ["optimum"]
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("transformers", "optimum", "onnxruntime", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_args(argv)
    if args.device == "cuda" and not cuda_available():
        log.warning("--device cuda: PyTorch or ONNX Runtime cannot use CUDA on this machine; nothing to measure, skipping.")
        return 0
    report = run(args)
    host = report["machine"]["host"]
    device = report["machine"].get("gpu", "cpu").replace(" ", "-").lower() if args.device == "cuda" else "cpu"
    stem = f"decode-{device}-{host}-{report['date'][:10]}{'-' + args.tag if args.tag else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    text = markdown(report)
    (args.out / f"{stem}.md").write_text(text, encoding="utf-8")
    log.info("Wrote %s.{json,md}", args.out / stem)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
