"""A scripted stand-in for ``Model``: for tests where the network is not the point.

After ``n`` tokens have been fed, it predicts ``script[n]`` (EOS past the script's end), so a test
appends ``script[:k]`` as the prompt and greedy generation reproduces ``script[k:]`` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from npctalk.engine.bundle import LicenseInfo, Manifest, SourceInfo
from npctalk.engine.errors import ContextOverflowError
from npctalk.engine.kv_cache import KVCache
from npctalk.engine.tokenizer import Tokenizer


class ScriptedModel:
    """Implements ``generator.LanguageModel``; records every ``forward`` call's ids in ``fed``."""

    def __init__(self, tokenizer: Tokenizer, script: Sequence[int], *, eos: int, max_context: int = 256) -> None:
        self.tokenizer = tokenizer
        self.script = list(script)
        self.fed: list[list[int]] = []
        self.manifest = Manifest(
            name="scripted", architecture="llama", dialogue_format="eos_joined", num_layers=1,
            num_attention_heads=1, num_kv_heads=1, head_dim=1, hidden_size=1, vocab_size=tokenizer.vocab_size,
            max_context=max_context, eos_token_ids=(eos,), pad_token_id=eos, bos_token_id=None, dtype="fp32",
            kv_dtype="fp32", device="cpu", source=SourceInfo("folder", "scripted"),
            license=LicenseInfo("MIT", "LICENSE", ""),
        )

    def new_cache(self, batch_size: int = 1) -> KVCache:
        return KVCache(0, batch_size, 1, 1, np.float32)  # no layers: only the mask (length) matters

    def forward(self, input_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        batch, seq = input_ids.shape
        if cache.length + seq > self.manifest.max_context:
            raise ContextOverflowError("scripted model context exceeded")
        self.fed.append(np.asarray(input_ids)[0].tolist())
        cache.update([], [], np.ones((batch, cache.length + seq), dtype=np.int64))
        n = cache.length
        target = self.script[n] if n < len(self.script) else self.manifest.eos_token_ids[0]
        logits = np.zeros((batch, self.manifest.vocab_size), dtype=np.float32)
        logits[:, target] = 10.0
        return logits
