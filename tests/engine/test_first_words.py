"""An NPC says something before it may stop: EOS is banned until the reply has visible text."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from test_scheduler import check_streams, run

from npctalk.engine.bundle import LicenseInfo, Manifest, SourceInfo
from npctalk.engine.first_words import FirstWords, with_first_words
from npctalk.engine.generator import Generator, GeneratorParams
from npctalk.engine.kv_cache import KVCache
from npctalk.engine.model import Model
from npctalk.engine.request import Request, RequestKey
from npctalk.engine.sampling import CHAT_DEFAULTS, SearchOptions
from npctalk.engine.scheduler import Scheduler, SchedulerConfig
from npctalk.engine.slot_model import SlotModel
from npctalk.engine.tokenizer import Tokenizer

EOS = 0


def _token(tokenizer: Tokenizer, text: str) -> int:
    ids = tokenizer.encode(text)
    assert len(ids) == 1, (text, ids)
    return ids[0]


class HushedModel:
    """A fake that always rates EOS best. Its runner-up is a line break for the reply's first token,
    then a word: without the ban every reply would be empty; with it, the reply is "\\n" + word."""

    def __init__(self, tokenizer: Tokenizer, prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.newline, self.word = _token(tokenizer, "\n"), _token(tokenizer, " the")
        self.manifest = Manifest(
            name="hushed", architecture="llama", dialogue_format="eos_joined", num_layers=1,
            num_attention_heads=1, num_kv_heads=1, head_dim=1, hidden_size=1, vocab_size=tokenizer.vocab_size,
            max_context=64, eos_token_ids=(EOS,), pad_token_id=EOS, bos_token_id=None, dtype="fp32",
            kv_dtype="fp32", device="cpu", source=SourceInfo("folder", "hushed"), license=LicenseInfo("MIT", "L", ""),
        )

    def new_cache(self, batch_size: int = 1) -> KVCache:
        return KVCache(0, batch_size, 1, 1, np.float32)

    def forward(self, input_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        batch, seq = input_ids.shape
        mask = np.concatenate([cache.mask, np.ones((batch, seq), dtype=np.int64)], axis=1)
        cache.update([], [], mask)
        logits = np.zeros((batch, self.manifest.vocab_size), dtype=np.float32)
        logits[:, EOS] = 10.0
        for row in range(batch):  # each row's reply position: the fed tokens past the prompt
            at = int(mask[row].sum()) - self.prompt_length
            logits[row, self.newline if at <= 0 else self.word] = 8.0
        return logits


def test_first_words_bans_eos_until_a_token_shows_text(byte_tokenizer: Tokenizer) -> None:
    first = FirstWords(byte_tokenizer, [EOS])
    assert first.bonus() == {EOS: float("-inf")}
    for blank in ("\n", " "):
        first.see(_token(byte_tokenizer, blank))
        assert not first.spoken and first.bonus() == {EOS: float("-inf")}
    first.see(EOS)  # an EOS that got through (it never should) says nothing either
    assert not first.spoken
    first.see(_token(byte_tokenizer, " the"))
    assert first.spoken and first.bonus() == {}
    assert with_first_words({5: 2.0, EOS: 3.0}, first) == {5: 2.0, EOS: 3.0}
    assert with_first_words({5: 2.0, EOS: 3.0}, FirstWords(byte_tokenizer, [EOS])) == {5: 2.0, EOS: float("-inf")}
    assert FirstWords(byte_tokenizer, []).spoken  # no EOS, nothing to ban


@pytest.mark.parametrize("options", [SearchOptions(max_new_tokens=8), dataclasses.replace(CHAT_DEFAULTS, seed=3)])
def test_a_scheduled_reply_is_not_empty_where_eos_is_likeliest(byte_tokenizer: Tokenizer,
                                                               options: SearchOptions) -> None:
    """Greedy and sampled (chat defaults: top-k 40 of a 1,000-token vocabulary, penalties): EOS
    comes after the first word, not before it."""
    prompt = byte_tokenizer.encode("Hello there")
    model = HushedModel(byte_tokenizer, len(prompt))
    scheduler = Scheduler(model, SchedulerConfig(prefix_cache_bytes=0))
    request = Request(RequestKey(b"c", "r"), prompt, options, byte_tokenizer, frozenset([EOS]), 64)
    scheduler.submit(request)
    check_streams(run(scheduler), [request])
    if options.greedy:
        assert request.tokens[len(prompt):] == [model.newline, model.word, EOS]
    assert request.text.strip() and request.finish_reason == "stop"


def test_the_generator_reply_is_not_empty_where_eos_is_likeliest(byte_tokenizer: Tokenizer) -> None:
    prompt = byte_tokenizer.encode("Hello there")
    model = HushedModel(byte_tokenizer, len(prompt))
    generator = Generator(model, GeneratorParams(model, SearchOptions(max_new_tokens=8)))  # type: ignore[arg-type]
    for _ in range(2):  # the second reply, after a rewind, is banned from EOS again
        generator.append_tokens(prompt)
        while not generator.is_done():
            generator.generate_next_token()
        assert generator.reply_tokens == [model.newline, model.word, EOS]
        generator.rewind_to(0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_eos_is_not_a_real_model_reply_s_first_token(family: str, request: pytest.FixtureRequest) -> None:
    """The tiny models, padded batch and slot decoder (whose greedy rows otherwise take the device's
    argmax without logits): with their own greedy first token declared EOS, each reply starts with
    another token instead of ending empty."""
    bundle: Path = request.getfixturevalue(f"{family}_bundle")
    slots_bundle: Path = request.getfixturevalue(f"{family}_slots_bundle")
    for model in (Model(bundle, provider="cpu", intra_op_threads=1),
                  SlotModel.open(slots_bundle, 4, 128, provider="cpu", intra_op_threads=1)):
        tok = model.tokenizer
        prompts = [tok.encode(t) for t in ("Hello traveller", "Any news from the mill?")]
        plain = _greedy_replies(model, prompts, frozenset(model.manifest.eos_token_ids))
        firsts = frozenset(r[0] for r in plain)
        hushed = _greedy_replies(model, prompts, frozenset(model.manifest.eos_token_ids) | firsts)
        for reply in hushed:
            assert reply[0] not in firsts, (family, reply)
            assert any(tok.decode([t]).strip() for t in reply if t not in firsts), (family, reply)


def _greedy_replies(model: Model | SlotModel, prompts: list[list[int]], eos: frozenset[int]) -> list[list[int]]:
    scheduler = Scheduler(model, SchedulerConfig(max_batch=2, prefix_cache_bytes=0))
    requests = [Request(RequestKey(b"c", str(i)), p, SearchOptions(max_new_tokens=6), model.tokenizer, eos,
                        model.manifest.max_context) for i, p in enumerate(prompts)]
    assert all(scheduler.submit(r) for r in requests)
    check_streams(run(scheduler), requests)
    return [r.tokens[len(r.prompt_ids):] for r in requests]


def test_a_greedy_reply_needs_its_logits_until_it_has_said_something(byte_tokenizer: Tokenizer) -> None:
    """A device's own argmax (``SlotBatch.forward_greedy``) knows nothing of the ban, so a greedy row
    asks for logits while blank, and stops asking once it has spoken."""
    request = Request(RequestKey(b"c", "r"), byte_tokenizer.encode("Hi"), SearchOptions(max_new_tokens=8),
                      byte_tokenizer, frozenset([EOS]), 64)
    assert request.needs_logits
    request.accept(_token(byte_tokenizer, "\n"), 0.0)
    assert request.needs_logits
    request.accept(_token(byte_tokenizer, " the"), 0.0)
    assert not request.needs_logits
