"""StreamingDetokenizer: chunks concatenate to the full decode, never a half character."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import CORPUS

from npctalk.engine.detokenizer import REPLACEMENT, StreamingDetokenizer
from npctalk.engine.tokenizer import Tokenizer

MULTIBYTE = [
    "東京の鍛冶屋は刀を作ります。 我们村子里有一位老铁匠。",
    "Dragons 🐉 and potions 🧪 and treasure 💰 await the brave 🛡️.",
    "Café crème, naïve façade, jalapeño — Ünïcödé wörds for the tokenizer.",
    " ".join(dict.fromkeys(CORPUS)),
]


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    detok = StreamingDetokenizer(tokenizer)
    chunks = [detok.push(i) for i in ids]
    chunks.append(detok.flush())
    assert detok.text == "".join(chunks)
    return chunks


@pytest.mark.parametrize("text", MULTIBYTE)
def test_byte_level_multibyte_never_broken(byte_tokenizer: Tokenizer, text: str) -> None:
    ids = byte_tokenizer.encode(text)
    # The test means something only if some token alone is half a character.
    assert any(REPLACEMENT in byte_tokenizer.decode([i]) for i in ids)
    chunks = stream(byte_tokenizer, ids)
    assert "".join(chunks) == byte_tokenizer.decode(ids) == text
    assert not any(REPLACEMENT in c for c in chunks)


@pytest.mark.parametrize("text", MULTIBYTE)
def test_metaspace_keeps_every_space(metaspace_tokenizer: Tokenizer, text: str) -> None:
    ids = metaspace_tokenizer.encode(text)
    naive = "".join(metaspace_tokenizer.decode([i]) for i in ids)
    full = metaspace_tokenizer.decode(ids)
    assert naive != full  # per-token decoding would drop spaces here
    assert "".join(stream(metaspace_tokenizer, ids)) == full


def test_special_tokens_are_skipped(byte_tokenizer: Tokenizer) -> None:
    ids = byte_tokenizer.encode("Hello<|im_end|> 東京<|endoftext|>", allow_special=True)
    assert "".join(stream(byte_tokenizer, ids)) == "Hello 東京"


def test_held_back_until_the_character_completes(byte_tokenizer: Tokenizer) -> None:
    ids = byte_tokenizer.encode("🐉")
    assert len(ids) > 1
    detok = StreamingDetokenizer(byte_tokenizer)
    assert [detok.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🐉"]
    assert detok.flush() == ""


def test_flush_drops_an_unfinished_tail(byte_tokenizer: Tokenizer) -> None:
    ids = byte_tokenizer.encode("ok 🐉")[:-1]
    assert byte_tokenizer.decode(ids).endswith(REPLACEMENT)
    detok = StreamingDetokenizer(byte_tokenizer)
    text = "".join(detok.push(i) for i in ids) + detok.flush()
    assert text == byte_tokenizer.decode(ids).replace(REPLACEMENT, "")
    assert text.startswith("ok")


@pytest.mark.parametrize("seed", range(20))
def test_random_ids_concatenate_exactly(byte_tokenizer: Tokenizer, metaspace_tokenizer: Tokenizer, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for tok in (byte_tokenizer, metaspace_tokenizer):
        ids = rng.integers(0, tok.vocab_size, size=60).tolist()
        chunks = stream(tok, ids)
        # Random ids hold invalid byte sequences: those are dropped, everything else is kept exactly.
        assert "".join(chunks) == tok.decode(ids).replace(REPLACEMENT, "")
        assert not any(REPLACEMENT in c for c in chunks)
