"""Generator: HF parity, seeds, rewind/prefix reuse, finish reasons, misuse errors."""

from __future__ import annotations

import dataclasses

from pathlib import Path

import numpy as np
import pytest
from fake_model import ScriptedModel

from npctalk.engine.errors import ConfigError, ContextOverflowError, GenerationError
from npctalk.engine.generator import Generator, GeneratorParams
from npctalk.engine.kv_cache import KVCache
from npctalk.engine.model import Model
from npctalk.engine.sampling import SearchOptions
from npctalk.engine.tokenizer import Tokenizer


def generate(model: Model, prompt: list[int], **options: object) -> Generator:
    params = GeneratorParams(model)
    params.set_search_options(**options)
    gen = Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    return gen


def chat_prompt(model: Model, text: str) -> list[int]:
    """A plausible prompt for either family: ChatML turn or DialoGPT's text + EOS."""
    tok, chat = model.tokenizer, model.manifest.chat_format
    if chat is None:
        return tok.encode(text) + [model.manifest.eos_token_ids[0]]
    return (tok.encode(chat.user_prefix, allow_special=True) + tok.encode(text)
            + tok.encode(chat.user_suffix + chat.assistant_prefix, allow_special=True))


@pytest.mark.parametrize("options", [{}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_matches_transformers(request: pytest.FixtureRequest, family: str, options: dict) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model: Model = request.getfixturevalue(f"{family}_model")
    hf_dir: Path = request.getfixturevalue(f"tiny_{family}_dir")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompt = chat_prompt(model, "What is your name, blacksmith?")
    eos = list(model.manifest.eos_token_ids)
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
            max_new_tokens=30, eos_token_id=eos, pad_token_id=model.manifest.pad_token_id, **options,
        )[0].tolist()
    ours = generate(model, prompt, max_new_tokens=30, **options)
    assert ours.tokens == expected
    assert ours.finish_reason == ("stop" if expected[-1] in eos else "length")


def test_same_seed_same_text_different_seed_different_text(model: Model) -> None:
    prompt = chat_prompt(model, "Tell me about the dragon 🐉.")
    kw = {"do_sample": True, "temperature": 1.0, "top_k": 0, "max_new_tokens": 24}
    runs = {seed: generate(model, prompt, seed=seed, **kw).reply_tokens for seed in range(4)}
    assert generate(model, prompt, seed=2, **kw).reply_tokens == runs[2]
    assert len({tuple(r) for r in runs.values()}) > 1


def test_rewind_then_append_equals_fresh_prefill(model: Model) -> None:
    prefix = model.tokenizer.encode("Hello traveller, welcome to the village of Ashford.")
    first, second = chat_prompt(model, "Who are you?"), chat_prompt(model, "Where is the mill?")
    fresh = generate(model, prefix + second, max_new_tokens=16)

    params = GeneratorParams(model)
    params.set_search_options(max_new_tokens=16)
    gen = Generator(model, params)
    gen.append_tokens(prefix)
    gen.append_tokens(first)
    while not gen.is_done():
        gen.generate_next_token()
    gen.rewind_to(len(prefix))
    assert gen.tokens == prefix and not gen.is_done() and gen.reply_tokens == []
    gen.append_tokens(second)
    while not gen.is_done():
        gen.generate_next_token()
    assert gen.tokens == fresh.tokens and gen.finish_reason == fresh.finish_reason


class _WideModel(ScriptedModel):
    """8,192 logits a position (above ``topk.MIN_VOCAB``, so the sampler picks from candidates and its
    history index), drawn from a seed of the position and the token fed there."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer, [], eos=0, max_context=512)
        self.manifest = dataclasses.replace(self.manifest, vocab_size=8192)

    def forward(self, input_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        super().forward(input_ids, cache)
        seed = cache.length * 8192 + int(np.asarray(input_ids)[0, -1])
        logits = np.random.default_rng(seed).standard_normal((1, 8192)).astype(np.float32)
        logits[0, 100:140] += 6.0  # a few favourite tokens: replies share them, so penalties matter
        logits[0, 0] = -1e9  # no EOS: every reply runs its length
        return logits


def test_a_rewound_reply_is_penalised_only_for_what_the_history_still_holds(byte_tokenizer: Tokenizer) -> None:
    """Repetition penalty and n-gram ban read an index of the history: after ``rewind_to`` it must
    forget the cut reply (a stale index would penalise its tokens), so the next reply equals a fresh
    one, also when the new history outgrows the old (only a new list shows the cut then)."""
    model = _WideModel(byte_tokenizer)
    options = {"max_new_tokens": 30, "repetition_penalty": 3.0, "no_repeat_ngram_size": 2}
    prefix, first, second = list(range(1, 11)), list(range(20, 25)), list(range(40, 90))

    def reply(gen: Generator) -> list[int]:
        while not gen.is_done():
            gen.generate_next_token()
        return gen.reply_tokens

    params = GeneratorParams(model)
    params.set_search_options(**options)
    fresh = Generator(model, params)
    fresh.append_tokens(prefix + second)
    want = reply(fresh)
    gen = Generator(model, params)
    gen.append_tokens(prefix + first)
    cut = reply(gen)
    assert set(cut) & set(want), "the cut reply shares tokens with the next one: a stale index would ban them"
    gen.rewind_to(len(prefix))
    gen.append_tokens(second)
    assert len(prefix + second) > len(prefix + first + cut)
    assert reply(gen) == want


def test_rewind_reuses_the_prefix_kv(byte_tokenizer: Tokenizer) -> None:
    eos = byte_tokenizer.token_to_id("<|im_end|>")
    model = ScriptedModel(byte_tokenizer, list(range(10, 40)), eos=eos)
    params = GeneratorParams(model)
    params.set_search_options(max_new_tokens=3)
    gen = Generator(model, params)
    gen.append_tokens(list(range(10, 20)))  # persona prefix
    gen.append_tokens([20, 21])
    while not gen.is_done():
        gen.generate_next_token()
    assert gen.reply_tokens == [22, 23, 24] and gen.finish_reason == "length"
    model.fed.clear()
    gen.rewind_to(10)
    gen.append_tokens([20, 21, 22])
    assert model.fed == [[20, 21, 22]]  # only the new turn ran; the prefix's KV was kept
    gen.generate_next_token()
    assert gen.get_next_tokens() == [23]
    # Rewinding onto a cached position recomputes just that one token's logits.
    gen.rewind_to(12)
    model.fed.clear()
    gen.generate_next_token()
    assert model.fed == [[21]] and gen.get_next_tokens() == [22]


def test_append_after_a_finished_reply_starts_a_new_one(byte_tokenizer: Tokenizer) -> None:
    eos = byte_tokenizer.token_to_id("<|im_end|>")
    model = ScriptedModel(byte_tokenizer, [1, 2, 3, eos, 5, 6, 7, eos], eos=eos)
    gen = Generator(model, GeneratorParams(model))
    gen.append_tokens([1, 2])
    while not gen.is_done():
        gen.generate_next_token()
    assert gen.reply_tokens == [3, eos] and gen.finish_reason == "stop"
    with pytest.raises(GenerationError, match="has finished"):
        gen.generate_next_token()
    gen.append_tokens([5])
    assert gen.finish_reason is None and gen.get_next_tokens() == []
    while not gen.is_done():
        gen.generate_next_token()
    assert gen.reply_tokens == [6, 7, eos] and gen.tokens == [1, 2, 3, eos, 5, 6, 7, eos]


def test_full_context_ends_with_length(byte_tokenizer: Tokenizer) -> None:
    eos = byte_tokenizer.token_to_id("<|im_end|>")
    model = ScriptedModel(byte_tokenizer, list(range(10, 60)), eos=eos, max_context=16)
    params = GeneratorParams(model)
    params.set_search_options(max_new_tokens=100)
    gen = Generator(model, params)
    gen.append_tokens(list(range(10, 22)))
    while not gen.is_done():
        gen.generate_next_token()
    assert gen.finish_reason == "length" and len(gen.tokens) == 16
    with pytest.raises(ContextOverflowError, match="context of 16 tokens"):
        gen.append_tokens([1])


def test_prompt_overflow_is_raised_with_the_numbers(gpt2_model: Model) -> None:
    limit = gpt2_model.manifest.max_context
    gen = Generator(gpt2_model, GeneratorParams(gpt2_model))
    with pytest.raises(ContextOverflowError, match=f"would be {limit} tokens.*context of {limit} tokens"):
        gen.append_tokens([5] * limit)
    assert gen.tokens == []


def test_misuse_raises_full_sentences(byte_tokenizer: Tokenizer) -> None:
    model = ScriptedModel(byte_tokenizer, [1, 2, 3], eos=0)
    gen = Generator(model, GeneratorParams(model))
    with pytest.raises(GenerationError, match="append_tokens"):
        gen.generate_next_token()
    with pytest.raises(GenerationError, match="Token ids must be in"):
        gen.append_tokens([model.manifest.vocab_size])
    gen.append_tokens([1])
    with pytest.raises(GenerationError, match="Cannot rewind to 5"):
        gen.rewind_to(5)
    params = GeneratorParams(model)
    with pytest.raises(ConfigError, match="Unknown search options"):
        params.set_search_options(temprature=0.5)
    with pytest.raises(ConfigError, match="top_p"):
        params.set_search_options(top_p=2.0)
    params.set_search_options(SearchOptions(top_k=3), seed=4)
    assert params.search_options == SearchOptions(top_k=3, seed=4)


def test_decode_speed_is_reported(model: Model, record_property: pytest.RecordProperty) -> None:
    """Informative only: greedy tokens/s of the tiny model (logged, never asserted)."""
    import time

    params = GeneratorParams(model)
    params.set_search_options(max_new_tokens=128)
    gen = Generator(model, params)
    gen.append_tokens([5, 6, 7])
    start, steps = time.perf_counter(), 0
    while not gen.is_done() and steps < 128:
        gen.generate_next_token()
        steps += 1
    rate = steps / (time.perf_counter() - start)
    record_property("tokens_per_second", round(rate))
    assert rate > 0 and np.isfinite(rate)
