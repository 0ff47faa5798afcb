"""The engine's host work per decode step at many streams, apart from the model's runs.

    python -m bench.host_cost [--streams 8 32 64] [--rounds 3] [--greedy]

On the H100 a 64-stream decode step of DialoGPT-medium takes ~2.2 ms, so Python work per step
(sampling from each row's top logits, history indexes, detokenizing, stop strings, events) decides
how close the server gets to the model's throughput. This measures that work on the CPU, where a
model small enough to cost little stands in: a 2-layer Llama of hidden size 32 with SmolLM2's real
tokenizer and 49,152-token vocabulary (random weights, built here, slots layout, on the slot
decoder as on the GPU), so the top-k, sampling and detokenizer work is real-sized.

Each round runs ``Scheduler`` in process from submit to the last reply (N requests at once, the
server's sampled defaults without fact steering, or greedy with ``--greedy``) and splits wall time
into ONNX Runtime runs (decoder step and TopK, timed around ``run_with_iobinding``) and the rest:
the host. Reports ms per step for both and µs of host work per stream-token.
Writes ``bench/results/host-cost-<host>-<date>[-tag].{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from bench.bundle_run import write_files

log = logging.getLogger("bench.host_cost")
RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 49_152


def build_model(work: Path, tokenizer_bundle: Path) -> Path:
    """The wide-vocabulary stand-in as a slots bundle under ``work`` (built once)."""
    bundle = work / "host-cost-llama-slots"
    if (bundle / "manifest.json").exists():
        return bundle
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from npctalk.export.api import ExportOptions, export_bundle

    folder = work / "host-cost-llama-hf"
    folder.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_bundle / "tokenizer.json"), eos_token="<|im_end|>",
                                  bos_token="<|im_start|>", unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = (  # ChatML, as SmolLM2's
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok.save_pretrained(folder)
    ids = tok.convert_tokens_to_ids
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                         bos_token_id=ids("<|im_start|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|im_end|>"),
                         tie_word_embeddings=True, initializer_range=0.05)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return export_bundle(folder, bundle, ExportOptions(dtype="fp32", layout="slots"))


def measure(bundle: Path, streams: int, args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    from npctalk.engine.request import Request, RequestKey
    from npctalk.engine.sampling import CHAT_DEFAULTS, SearchOptions
    from npctalk.engine.scheduler import Scheduler, SchedulerConfig
    from npctalk.engine.slot_model import SlotModel

    model = SlotModel.open(bundle, streams + 4, max(256, args.prompt_tokens + args.new_tokens + 8), provider="cpu", intra_op_threads=args.threads)
    options = (SearchOptions(max_new_tokens=args.new_tokens) if args.greedy else
               dataclasses.replace(CHAT_DEFAULTS, max_new_tokens=args.new_tokens, fact_bias=0.0))
    spent = [0.0]
    run = ort.InferenceSession.run_with_iobinding

    def timed(self: Any, *a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        try:
            return run(self, *a, **k)
        finally:
            spent[0] += time.perf_counter() - start

    def one_round(tag: str) -> dict[str, float]:
        scheduler = Scheduler(model, SchedulerConfig(max_batch=streams, max_queue=streams, prefix_cache_bytes=0,
                                                     prefill_chunk=0))
        for i in range(streams):
            prompt = model.tokenizer.encode(f"Hello traveller number {i}, what news from the village of Ashford?")
            if args.prompt_tokens:  # a game's prompt: persona, memory and turn (~400 tokens for the built-in NPCs)
                filler = model.tokenizer.encode(" The smith of Ashford mends ploughs and shoes the miller's horses.")
                prompt = (filler * (args.prompt_tokens // len(filler) + 1))[:args.prompt_tokens - len(prompt)] + prompt
            request = Request(RequestKey(b"bench", f"{tag}{i}"), prompt, dataclasses.replace(options, seed=i),
                              model.tokenizer, frozenset(model.manifest.eos_token_ids), model.manifest.max_context,
                              received_at=0.0)
            scheduler.submit(request)
        spent[0], steps = 0.0, 0
        start = time.perf_counter()
        while scheduler.has_work:
            scheduler.step()
            steps += 1
        wall = time.perf_counter() - start
        tokens = scheduler.counters["tokens"]
        return {"steps": steps, "tokens": tokens, "wall_ms_step": wall / steps * 1000, "ort_ms_step": spent[0] / steps * 1000,
                "host_ms_step": (wall - spent[0]) / steps * 1000, "host_us_token": (wall - spent[0]) / tokens * 1e6,
                "from_full": scheduler.stats()["sampled"]["from_full"]}

    ort.InferenceSession.run_with_iobinding = timed
    try:
        one_round("warm")
        rounds = [one_round(f"r{k}") for k in range(args.rounds)]
    finally:
        ort.InferenceSession.run_with_iobinding = run
    median = {key: round(statistics.median(r[key] for r in rounds), 3) for key in rounds[0]}
    log.info("%d streams: host %.2f ms a step (%.1f µs a token), ONNX Runtime %.2f ms", streams, median["host_ms_step"],
             median["host_us_token"], median["ort_ms_step"])
    return {"streams": streams, **median, "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    from npctalk.engine.paths import default_bundle_path, home

    parser = argparse.ArgumentParser(prog="python -m bench.host_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--greedy", action="store_true", help="greedy without penalties instead of the sampled defaults")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (the model is a stand-in)")
    parser.add_argument("--prompt-tokens", type=int, default=0,
                        help="grow each prompt to this many tokens (default: the ~15-token greeting alone)")
    parser.add_argument("--tokenizer-bundle", type=Path, default=None,
                        help="bundle whose tokenizer.json to use (default: the default bundle; `export-onnx default`)")
    parser.add_argument("--work", type=Path, default=None, help="where the stand-in model is built (default: NPCTALK_HOME/bench)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    tokenizer_bundle = args.tokenizer_bundle or default_bundle_path()
    if not (tokenizer_bundle / "tokenizer.json").exists():
        parser.error(f"no tokenizer.json in {tokenizer_bundle}; run `export-onnx default` or pass --tokenizer-bundle")
    bundle = build_model(args.work or home() / "bench", tokenizer_bundle)
    rows = [measure(bundle, n, args) for n in args.streams]
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    mode = "greedy" if args.greedy else "sampled (server defaults, no fact steering)"
    report = {"date": date, "host": platform.node(), "processor": platform.processor() or platform.machine(),
              "mode": mode, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "threads": args.threads, "note": args.note, "rows": rows}
    lines = [f"# Host work per decode step: {mode}", "",
             f"{date} · {report['host']} · stand-in: 2-layer Llama, hidden 32, SmolLM2's tokenizer and {VOCAB:,}-token "
             f"vocabulary, slot decoder on the CPU ({args.threads} thread); {args.new_tokens} new tokens per stream"
             f"{f', {args.prompt_tokens}-token prompts' if args.prompt_tokens else ''}; "
             f"median of {args.rounds} rounds.", ""]
    if args.note:
        lines += [f"**Note:** {args.note}", ""]
    lines += ["| streams | steps | host ms/step | host µs/token | ONNX Runtime ms/step | whole-row picks |",
              "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['streams']} | {r['steps']:.0f} | {r['host_ms_step']} | {r['host_us_token']} | {r['ort_ms_step']} | "
              f"{r['from_full']:.0f} |" for r in rows]
    write_files(args.out, ["host-cost", report["host"], date[:10], args.tag], report, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
