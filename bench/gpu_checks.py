"""Checks of a slots bundle on its device that are not speed: where ONNX Runtime placed each node,
what loading it costs in device memory, and whether the CUDA-graph step gives the same tokens.

    python -m bench.gpu_checks --bundle BUNDLE [--device cuda] [--out DIR]

- placement: one prefill and one decode step with ONNX Runtime's profiler on; every node that ran,
  by execution provider (the fast path needs all of them on CUDA: a CPU node means copies and no
  CUDA graph).
- memory (CUDA): device memory taken by loading the bundle into a ``SlotDecoder`` with one slot of
  the model's full context (weights, KV buffers, ONNX Runtime's workspace), read with
  ``cudaMemGetInfo`` (through PyTorch) before and after.
- topk: the sampling path's small graphs (``engine/topk.py``: TopK, the bonused TopK with its
  ScatterElements ``add``, the one-row Gather) run once each on the device with the profiler on:
  their nodes by execution provider (a CPU node there copies a step's whole logits to the host),
  and whether the device's bonused candidates equal the host's.
- parity: greedy tokens of four prompts, 32 each, through the slot decoder with the CUDA graph,
  without it, and through the generic engine path (``Model``); the share of equal tokens.
- snapshots: persona-prefix snapshots on the device (``engine/slot_copy.py``): their graphs' nodes
  by execution provider; a prompt's first half copied out of one slot and into another, then the
  rest read and 32 greedy tokens, against the whole prompt read in one slot (share of equal tokens,
  first logits); and the time to copy a 256-token prefix out and back in against reading it.
- reads: what a burst of N says with a cached persona prefix costs the device to admit, N = 2 and 6
  (prompts of a 280-token prefix and a 44-token turn): each turn read alone after the prefix's
  snapshot is copied into its slot (the default), against the N whole prompts read together in one
  ``prefill_many`` (``serve --group-cached-prompts``), timed as the server times them at start
  (``read_policy.time_reads``); median ms of each, their ratio, and whether both ways give every say
  the same greedy first token.

Writes ``gpu-checks-<model>-<device>.json`` (and logs a summary) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench.gpu_checks")


def placement(bundle: Path, device: str, out: Path) -> dict[str, Any]:
    from npctalk.engine.bundle import load_manifest
    from npctalk.engine.kv_cache import KV_DTYPES

    manifest = load_manifest(bundle)
    session = _profiled_session(str(bundle / manifest.model_file), device, out / "profile")
    io = manifest.io
    kv = KV_DTYPES[manifest.kv_dtype]
    n = 8
    past = {io[f"past_{kind}"].format(layer=i): np.zeros((1, manifest.num_kv_heads, 0, manifest.head_dim), kv)
            for i in range(manifest.num_layers) for kind in ("key", "value")}
    feed = {io["input_ids"]: np.arange(1, n + 1, dtype=np.int64)[None], io["position_ids"]: np.arange(n, dtype=np.int64)[None],
            io["seqlens_k"]: np.array([n - 1], np.int32), io["total_sequence_length"]: np.array(n, np.int32), **past}
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, feed)))
    step = {io["input_ids"]: np.array([[5]], np.int64), io["position_ids"]: np.array([[n]], np.int64),
            io["seqlens_k"]: np.array([n], np.int32), io["total_sequence_length"]: np.array(n + 1, np.int32)}
    step.update({io[f"past_{kind}"].format(layer=i): outputs[io[f"present_{kind}"].format(layer=i)]
                 for i in range(manifest.num_layers) for kind in ("key", "value")})
    session.run(None, step)
    trace = json.loads(Path(session.end_profiling()).read_text())
    by_provider: dict[str, set[str]] = {}
    for event in trace:
        if event.get("cat") == "Node" and "provider" in event.get("args", {}):
            node = event["name"].removesuffix("_kernel_time").removesuffix("_fence_before").removesuffix("_fence_after")
            by_provider.setdefault(event["args"]["provider"], set()).add(node)
    cpu_nodes = sorted(by_provider.get("CPUExecutionProvider", set()))
    return {"nodes_by_provider": {k: len(v) for k, v in sorted(by_provider.items())},
            "cpu_nodes": cpu_nodes[:20],
            "session_providers": session.get_providers()}


def topk_placement(device: str, out: Path, vocab: int = 50257, rows: int = 64, k: int = 64) -> dict[str, Any]:
    import onnxruntime as ort

    from npctalk.engine import topk
    from npctalk.engine.sampling import add_bonus

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((rows, 1, vocab)).astype(np.float32)
    outside = np.argsort(-logits[:, 0], axis=-1)[:, k + 5]  # (rows,): lifted into the top by the bonus
    bonus = topk.Bonus.of([{int(t): 30.0, 0: float("-inf")} for t in outside], rows)
    assert bonus is not None
    value = ort.OrtValue.ortvalue_from_numpy(logits, device, 0)
    feeds = {"topk": {"logits": value}, "bonused_topk": {"logits": value, "bonus_ids": bonus.ids, "bonus_values": bonus.values},
             "row": {"logits": value, "index": np.array([3], np.int64)}}
    report: dict[str, Any] = {}
    for name, graph in topk.graphs(k).items():
        session = _profiled_session(graph, device, out / f"profile-{name}")
        binding = session.io_binding()
        for key, feed in feeds[name].items():
            if isinstance(feed, ort.OrtValue):
                binding.bind_ortvalue_input(key, feed)
            else:
                binding.bind_cpu_input(key, feed)
        for output in session.get_outputs():
            binding.bind_output(output.name, "cpu")
        session.run_with_iobinding(binding)
        report[name] = _providers_seen(session)
    ids, values = topk.TopK(k, device).of_value(value, vocab, bonus)
    host = add_bonus(logits[:, 0], {})  # (rows, vocab)
    same = all(set(ids[r].tolist()) == set(np.argsort(-add_bonus(host[r:r + 1], {int(outside[r]): 30.0, 0: float("-inf")})[0])[:k].tolist())
               and int(outside[r]) in ids[r] for r in range(rows))
    report["bonused_equals_host"] = same
    return report


def memory(bundle: Path) -> dict[str, Any]:
    import torch

    from npctalk.engine.slots import SlotDecoder

    torch.cuda.init()
    free_before = torch.cuda.mem_get_info()[0]
    decoder = SlotDecoder(bundle, slots=1, provider="cuda")
    token = decoder.prefill(0, list(range(1, 65)))
    for _ in range(4):
        token = int(decoder.step([token])[0])
    free_after = torch.cuda.mem_get_info()[0]
    files = [bundle / decoder.manifest.model_file, bundle / (decoder.manifest.model_file + ".data")]
    weights = sum(f.stat().st_size for f in files if f.exists())
    result = {"loaded_mb": round((free_before - free_after) / 1e6, 1), "kv_mb": round(decoder.kv_bytes / 1e6, 1),
              "model_file_mb": round(weights / 1e6, 1), "capacity": decoder.capacity, "cuda_graph": decoder.cuda_graph}
    result["loaded_minus_kv_mb"] = round(result["loaded_mb"] - result["kv_mb"], 1)
    del decoder
    return result


def parity(bundle: Path, device: str) -> dict[str, Any]:
    from npctalk.engine.model import Model
    from npctalk.engine.slots import SlotDecoder

    rng = np.random.default_rng(7)
    manifest_vocab = Model(bundle, provider=device).manifest.vocab_size
    prompts = [rng.integers(10, manifest_vocab, size=length).tolist() for length in (12, 40, 64, 97)]
    runs: dict[str, list[list[int]]] = {}
    for label, graph in (("slots_graph", True), ("slots_plain", False)):
        decoder = SlotDecoder(bundle, slots=len(prompts), capacity=256, provider=device, cuda_graph=graph)
        runs[label] = decoder.greedy(prompts, 32)
        runs[label + "_used_graph"] = [[int(decoder.cuda_graph)]]
        del decoder
    model = Model(bundle, provider=device)
    generic = []
    for prompt in prompts:
        cache = model.new_cache(1)
        logits = model.forward(np.array([prompt]), cache)
        tokens = [int(logits[0].argmax())]
        for _ in range(31):
            tokens.append(int(model.forward(np.array([[tokens[-1]]]), cache)[0].argmax()))
        generic.append(tokens)

    def share(a: list[list[int]], b: list[list[int]]) -> float:
        pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
        return round(sum(x == y for x, y in pairs) / len(pairs), 4)

    # The prompts read together (one right-padded batch + one step): the same tokens as one by one,
    # and the same first-token logits, on this device's kernels.
    decoder = SlotDecoder(bundle, slots=len(prompts), capacity=256, provider=device, cuda_graph=True)
    together = [[int(t)] for t in decoder.prefill_many(list(range(len(prompts))), prompts)]
    first_together = decoder.logits()[:len(prompts)].copy()
    tokens = np.array([row[0] for row in together], dtype=np.int64)
    for _ in range(31):
        tokens = decoder.step(tokens)
        for row, token in zip(together, tokens):
            row.append(int(token))
    first_alone = []
    for slot, prompt in enumerate(prompts):
        decoder.release(slot)
        decoder.prefill(slot, prompt)
        first_alone.append(decoder.logits()[0])
    del decoder
    return {"graph_vs_plain": share(runs["slots_graph"], runs["slots_plain"]),
            "slots_vs_generic": share(runs["slots_plain"], generic),
            "together_vs_alone": share(together, runs["slots_graph"]),
            "together_first_logits_max_diff": round(float(np.abs(first_together - np.stack(first_alone)).max()), 5),
            "graph_used": bool(runs["slots_graph_used_graph"][0][0]), "tokens_each": 32, "prompts": len(prompts)}


def _profiled_session(model: bytes | str, device: str, prefix: Path) -> Any:
    """A session of a graph (bytes, or a model file's path) on ``device`` (CPU behind CUDA, as the engine
    runs it) that profiles its runs to ``prefix``*.json, for ``_providers_seen``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(model, options, providers=providers)


def _providers_seen(session: Any) -> dict[str, int]:
    trace = json.loads(Path(session.end_profiling()).read_text())
    seen: dict[str, int] = {}
    for event in trace:
        if event.get("cat") == "Node" and "provider" in event.get("args", {}) and event["name"].endswith("_kernel_time"):
            seen[event["args"]["provider"]] = seen.get(event["args"]["provider"], 0) + 1
    return seen


def snapshots(bundle: Path, device: str, out: Path, repeats: int = 20) -> dict[str, Any]:
    import time

    from npctalk.engine import onnx_proto, slot_copy
    from npctalk.engine.bundle import load_manifest
    from npctalk.engine.kv_cache import KV_DTYPES
    from npctalk.engine.slots import SlotDecoder

    decoder = SlotDecoder(bundle, slots=2, capacity=min(512, load_manifest(bundle).max_context), provider=device)
    m = decoder.manifest
    report: dict[str, Any] = {}
    dtype = KV_DTYPES[m.kv_dtype]
    count, tensor = 2 * m.num_layers, np.ones((1, m.num_kv_heads, 8, m.head_dim), dtype)
    feeds = {"take": {**{f"kv{i}": tensor for i in range(count)}, "length": np.array([4], np.int64)},
             "put": {**{f"snap{i}": tensor for i in range(count)}, "pads": np.array([0, 0, 0, 0, 0, 0, 8, 0], np.int64)}}
    for name, graph in slot_copy.graphs(count, onnx_proto.ELEMENT_TYPES[np.dtype(dtype).name]).items():
        session = _profiled_session(graph, device, out / f"profile-copy-{name}")
        session.run(None, feeds[name])
        report[f"{name}_nodes_by_provider"] = _providers_seen(session)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(10, m.vocab_size, size=length).tolist() for length in (12, 40, 97)]
    same, total, worst = 0, 0, 0.0
    for prompt in prompts:
        whole = decoder.greedy([prompt], 32)[0]
        decoder.release(0)
        decoder.prefill(0, prompt)
        first_whole = decoder.logits()[0].copy()
        half = len(prompt) // 2
        snapshot = decoder.snapshot(0, half)
        decoder.release(0)
        decoder.restore(1, snapshot)
        tokens = [decoder.prefill(1, prompt[half:])]
        worst = max(worst, float(np.abs(decoder.logits()[0] - first_whole).max()))
        while len(tokens) < 32:
            tokens.append(int(decoder.step([0, tokens[-1]], [False, True])[1]))
        decoder.release(1)
        same += sum(a == b for a, b in zip(tokens, whole))
        total += len(whole)
    report.update(restored_vs_whole=round(same / total, 4), restored_first_logits_max_diff=round(worst, 5))
    prefix = rng.integers(10, m.vocab_size, size=min(256, decoder.capacity)).tolist()
    timings: dict[str, list[float]] = {"read_ms": [], "snapshot_ms": [], "restore_ms": []}
    for _ in range(repeats + 2):  # the first two warm up
        start = time.perf_counter()
        decoder.prefill(0, prefix)
        decoder.logits()  # what the scheduler reads after a prompt: the run has finished
        timings["read_ms"].append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        snapshot = decoder.snapshot(0)
        timings["snapshot_ms"].append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        decoder.restore(1, snapshot)
        timings["restore_ms"].append((time.perf_counter() - start) * 1e3)
        decoder.release(0)
        decoder.release(1)
    medians = {key: round(float(np.median(values[2:])), 3) for key, values in timings.items()}
    report.update(prefix_tokens=len(prefix), **medians, read_over_restore=round(medians["read_ms"] / medians["restore_ms"], 2),
                  snapshot_mb=round(snapshot.nbytes / 1e6, 2), copy_graphs=decoder.copier.graph)
    del decoder
    return report


def reads(bundle: Path, device: str, repeats: int = 10, groups: tuple[int, ...] = (2, 6),
          prefix_tokens: int = 280, turn_tokens: int = 44) -> dict[str, Any]:
    from npctalk.engine.bundle import load_manifest
    from npctalk.engine.read_policy import time_reads
    from npctalk.engine.slots import SlotDecoder

    decoder = SlotDecoder(bundle, slots=max(groups) + 1, capacity=min(512, load_manifest(bundle).max_context),
                          provider=device)
    report: dict[str, Any] = {"prefix_tokens": prefix_tokens, "turn_tokens": turn_tokens}
    for n in groups:  # the server's own timing (read_policy), at each burst size
        times = time_reads(decoder, says=n, prefix=prefix_tokens, turn=turn_tokens, repeats=repeats)
        if times is None:
            raise ValueError(f"the decoder's slots cannot hold {n} says of {prefix_tokens} + {turn_tokens} tokens")
        alone, together = round(times.alone_ms, 3), round(times.together_ms, 3)
        report[f"says_{n}"] = {"alone_ms": alone, "together_ms": together,
                               "alone_over_together": round(alone / together, 2),
                               "same_first_tokens": times.same_first_tokens}
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_checks", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a slots-layout bundle (export-onnx --device cuda)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"bundle": str(args.bundle), "device": args.device}
    checks = [("placement", lambda: placement(args.bundle, args.device, args.out)),
              ("topk", lambda: topk_placement(args.device, args.out)), ("parity", lambda: parity(args.bundle, args.device)),
              ("snapshots", lambda: snapshots(args.bundle, args.device, args.out)),
              ("reads", lambda: reads(args.bundle, args.device))]
    if args.device == "cuda":
        checks.insert(1, ("memory", lambda: memory(args.bundle)))
    for name, check in checks:
        try:
            report[name] = check()
        except Exception as exc:  # each check reports on its own; one failing does not hide the others
            log.exception("%s failed", name)
            report[name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        log.info("%s: %s", name, json.dumps(report[name]))
    stem = f"gpu-checks-{args.bundle.name}-{args.device}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log.info("Wrote %s", args.out / f"{stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
