"""Engine fixtures: tokenizers that need no torch, and loaded models of the tiny bundles."""

from __future__ import annotations

from pathlib import Path

import pytest

from npctalk.engine.model import Model
from npctalk.engine.tokenizer import Tokenizer

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="session")
def byte_tokenizer() -> Tokenizer:
    """The tiny models' byte-level BPE (ChatML specials), trained in-process: multi-byte chars split."""
    from tiny_models import _train_tokenizer

    return Tokenizer(_train_tokenizer(CHATML_SPECIALS))


@pytest.fixture(scope="session")
def metaspace_tokenizer() -> Tokenizer:
    """A SentencePiece-style BPE (Metaspace ``▁`` spaces, leading space stripped on decode)."""
    from tiny_models import CORPUS
    from tokenizers import SentencePieceBPETokenizer

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(CORPUS, vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    return Tokenizer(sp._tokenizer)


@pytest.fixture(scope="session")
def gpt2_model(gpt2_bundle: Path) -> Model:
    return Model(gpt2_bundle, provider="cpu", intra_op_threads=1)


@pytest.fixture(scope="session")
def llama_model(llama_bundle: Path) -> Model:
    return Model(llama_bundle, provider="cpu", intra_op_threads=1)


@pytest.fixture(params=["gpt2", "llama"])
def model(request: pytest.FixtureRequest) -> Model:
    """Each tiny model family in turn."""
    return request.getfixturevalue(f"{request.param}_model")
