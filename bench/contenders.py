"""The contenders of ``bench/decode.py``: one run's settings, the timing of a row, and how each
engine (npctalk's generic path and its slot decoder, Hugging Face PyTorch, optimum's
ORTModelForCausalLM, llama.cpp) prefills a batch of prompts and decodes its new tokens. Each
``run_*`` returns (ttft_ms, decode_tok_s, e2e_tok_s) (``run_slots`` adds a dict of details).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench.decode")
SEED = 0


@dataclass(frozen=True)
class Settings:
    """One run's shape: tokens, streams, device and CPU threads (None = one per core)."""

    prompt_tokens: int = 64
    new_tokens: int = 128
    streams: tuple[int, ...] = (1, 4, 16)
    device: str = "cpu"
    threads: int | None = None
    repeats: int = 1


def prompts(vocab: int, settings: Settings, streams: int) -> np.ndarray:
    """(streams, prompt_tokens) token ids, fixed by the seed."""
    rng = np.random.default_rng(SEED)
    return rng.integers(10, vocab, size=(streams, settings.prompt_tokens), dtype=np.int64)


def timed_row(first: Callable[[], None], rest: Callable[[], None], streams: int, settings: Settings) -> tuple[float, float, float]:
    """Run ``first`` (prefill + first token of every stream) then ``rest``; (ttft_ms, decode_tok_s, e2e_tok_s)."""
    start = time.perf_counter()
    first()
    mid = time.perf_counter()
    rest()
    end = time.perf_counter()
    later = streams * (settings.new_tokens - 1)
    return (mid - start) * 1000, later / max(end - mid, 1e-9), streams * settings.new_tokens / (end - start)


_MODELS: dict[Path, Any] = {}  # the last loaded Model, reused across stream counts


def release_models() -> None:
    """Forget the cached npctalk Model (before the peers run, so its memory is not held)."""
    _MODELS.clear()


# --- the contenders -----------------------------------------------------------------------------

def run_npctalk(bundle: Path, settings: Settings, streams: int) -> tuple[float, float, float]:
    from npctalk.engine.batch import DecodeBatch
    from npctalk.engine.model import Model

    model = _MODELS.get(bundle) or Model(bundle, provider=settings.device, intra_op_threads=settings.threads)
    _MODELS.clear()
    _MODELS[bundle] = model
    ids = prompts(model.manifest.vocab_size, settings, streams)
    warm: DecodeBatch[int] = DecodeBatch(model)  # first runs at these shapes allocate; keep them out of the timing
    warm.add([(row, model.new_cache(1)) for row in range(streams)])
    for _ in range(3):
        warm.forward([1] * streams)
    batch: DecodeBatch[int] = DecodeBatch(model)
    state: dict[str, Any] = {}

    def first() -> None:
        joiners, tokens = [], []
        for row in range(streams):  # admitted one by one, as the scheduler does
            cache = model.new_cache(1)
            logits = model.forward(ids[row:row + 1], cache)  # (1, vocab)
            tokens.append(int(logits[0].argmax()))
            joiners.append((row, cache))
        batch.add(joiners)
        state["tokens"] = tokens

    def rest() -> None:
        tokens = state["tokens"]
        for _ in range(settings.new_tokens - 1):
            logits = batch.forward(tokens)  # (streams, vocab)
            tokens = logits.argmax(axis=1).tolist()

    return timed_row(first, rest, streams, settings)


def run_slots(bundle: Path, settings: Settings, streams: int, cuda_graph: bool = True,
              ttft_prompt: int = 0, together: bool = False) -> tuple[float, float, float, dict[str, Any]]:
    """npctalk's fast path (``engine/slots.py``): one KV slot per stream on the device, updated in
    place, the step replayed as a CUDA graph when ``cuda_graph``, greedy tokens taken on the device.
    Prompts are prefilled one by one, or with ``together`` all in one ``prefill_many`` (the
    scheduler's burst of joiners), then every step decodes all streams. Also returns details:
    whether the CUDA graph ran, and with ``ttft_prompt`` the median time to first token of a prompt
    that long (batch 1: prefill + the token, 5 runs)."""
    from npctalk.engine.slots import SlotDecoder

    capacity = max(settings.prompt_tokens, ttft_prompt) + settings.new_tokens + 8
    decoder = SlotDecoder(bundle, slots=streams, capacity=capacity, provider=settings.device,
                          cuda_graph=cuda_graph, intra_op_threads=settings.threads)
    ids = prompts(decoder.manifest.vocab_size, settings, streams)
    tokens = np.zeros(streams, dtype=np.int64)
    for slot in range(streams):  # warm-up: allocations at these shapes, and the graph's capture, outside the timing
        tokens[slot] = decoder.prefill(slot, ids[slot])
    if together:
        for slot in range(streams):
            decoder.release(slot)
        tokens = decoder.prefill_many(list(range(streams)), list(ids))
    # Every step the timed run makes: each length bucket it crosses is its own CUDA graph, captured on
    # its first run (tens of ms); a server captures each once in its life, so it stays out of the timing.
    for _ in range(settings.new_tokens - 1):
        tokens = decoder.step(tokens)
    for slot in range(streams):
        decoder.release(slot)
    state: dict[str, Any] = {}

    def first() -> None:
        if together:
            state["tokens"] = decoder.prefill_many(list(range(streams)), list(ids))
        else:
            state["tokens"] = np.array([decoder.prefill(slot, ids[slot]) for slot in range(streams)], dtype=np.int64)

    def rest() -> None:
        tokens = state["tokens"]
        for _ in range(settings.new_tokens - 1):
            tokens = decoder.step(tokens)

    ttft, dec, e2e = timed_row(first, rest, streams, settings)
    details: dict[str, Any] = {"cuda_graph": decoder.cuda_graph, "fallback": decoder.fallback_reason,
                               "kv_mb": round(decoder.kv_bytes / 1e6, 1)}
    if ttft_prompt:
        long = np.random.default_rng(SEED + 1).integers(10, decoder.manifest.vocab_size, size=ttft_prompt)
        times = []
        for _ in range(6):
            decoder.release(0)
            start = time.perf_counter()
            decoder.prefill(0, long)
            times.append((time.perf_counter() - start) * 1000)
        details[f"ttft_{ttft_prompt}_ms"] = round(float(np.median(times[1:])), 2)
    del decoder
    return ttft, dec, e2e, details


def _torch_device(settings: Settings) -> tuple[Any, Any]:
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    return torch, (torch.float16 if settings.device == "cuda" else torch.float32)


def run_hf(hf_folder: Path, settings: Settings, streams: int) -> tuple[float, float, float]:
    torch, dtype = _torch_device(settings)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_folder, torch_dtype=dtype).to(settings.device).eval()
    ids = torch.from_numpy(prompts(model.config.vocab_size, settings, streams)).to(settings.device)
    return _time_generate(model, ids, settings, streams, torch)


def run_optimum(hf_folder: Path, work: Path, settings: Settings, streams: int) -> tuple[float, float, float]:
    torch, _ = _torch_device(settings)
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    saved = work / "optimum" / hf_folder.name
    provider = "CUDAExecutionProvider" if settings.device == "cuda" else "CPUExecutionProvider"
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.threads or 0
    if not (saved / "config.json").exists():
        log.info("optimum: exporting %s", hf_folder.name)
        ORTModelForCausalLM.from_pretrained(hf_folder, export=True, use_cache=True).save_pretrained(saved)
    model = ORTModelForCausalLM.from_pretrained(saved, provider=provider, session_options=options, use_cache=True)
    ids = torch.from_numpy(prompts(model.config.vocab_size, settings, streams))
    if settings.device == "cuda":
        ids = ids.to("cuda")
    return _time_generate(model, ids, settings, streams, torch)


def _time_generate(model: Any, ids: Any, settings: Settings, streams: int, torch: Any) -> tuple[float, float, float]:
    """TTFT from a 1-token generate(); the rate from the full 128-token generate() minus that."""
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)

    def generate(n: int) -> None:
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        assert out.shape[1] == ids.shape[1] + n, out.shape
        if settings.device == "cuda":
            torch.cuda.synchronize()

    generate(2)  # warm-up
    start = time.perf_counter()
    generate(1)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    generate(settings.new_tokens)
    total = time.perf_counter() - start
    later = streams * (settings.new_tokens - 1)
    return ttft * 1000, later / max(total - ttft, 1e-9), streams * settings.new_tokens / total


def run_llama_cpp(gguf: Path, settings: Settings, threads: int) -> tuple[float, float, float]:
    """Batch 1 through llama-cpp-python's completion API, EOS banned so all tokens are generated."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False, seed=SEED)
    ids = prompts(llm.n_vocab(), settings, 1)[0].tolist()
    # Every end-of-generation token (EOS, <|im_end|>, ...) banned: llama.cpp stops on any of them.
    import llama_cpp

    ban = {t: -1e9 for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t)}

    def completion(n: int) -> tuple[float, int]:
        llm.reset()
        start, first, count = time.perf_counter(), 0.0, 0
        for _ in llm.create_completion(ids, max_tokens=n, temperature=0.0, logit_bias=ban, stream=True):
            count += 1
            first = first or time.perf_counter() - start
        return first, count

    completion(4)  # warm-up
    start = time.perf_counter()
    first, count = completion(settings.new_tokens)
    total = time.perf_counter() - start
    if count < settings.new_tokens:
        log.warning("llama.cpp stopped after %d of %d tokens", count, settings.new_tokens)
    return first * 1000, (count - 1) / max(total - first, 1e-9), count / total
