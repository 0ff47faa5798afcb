"""The bundle's tokenizer: Hugging Face ``tokenizers`` only (no transformers, no torch).

Player text must never turn into control tokens: ``encode(text)`` tokenizes ``<|im_start|>`` or
``<|endoftext|>`` as the plain characters they are made of. Only template pieces the engine itself
writes are encoded with ``allow_special=True``.

``tokenizers`` keeps the special-token switch (``encode_special_tokens``) on the tokenizer object,
so flipping it per call would race between threads. We hold two copies instead, each with the
switch fixed for its lifetime. Both are safe to use from several threads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as _Backend

from .errors import BundleError

log = logging.getLogger(__name__)


class Tokenizer:
    """Text ↔ token ids for one bundle. Encoding never adds BOS/EOS or other post-processor tokens."""

    def __init__(self, backend: _Backend) -> None:
        serialized = backend.to_str()
        # Special-token syntax in text is parsed into control ids: only for the engine's own pieces.
        self._special = _Backend.from_str(serialized)
        self._special.encode_special_tokens = False
        # Special-token syntax is split like any other text: for everything a player may type.
        self._plain = _Backend.from_str(serialized)
        self._plain.encode_special_tokens = True
        self._special_ids = frozenset(
            i for i, tok in self._special.get_added_tokens_decoder().items() if tok.special
        )

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json``; ``BundleError`` when it is missing or unreadable."""
        path = Path(path)
        try:
            return cls(_Backend.from_file(str(path)))
        except Exception as exc:  # tokenizers raises bare Exception for missing and malformed files
            raise BundleError(f"Cannot read tokenizer {path}: {exc}.") from exc

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._special.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of special (control) tokens, such as ``<|endoftext|>``."""
        return self._special_ids

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``. ``allow_special`` False makes ``<|…|>`` markup inert plain text."""
        backend = self._special if allow_special else self._plain
        return backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special_tokens`` is False."""
        return self._special.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (e.g. ``"<|im_end|>"``), None when absent."""
        return self._special.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry of an id (byte-level form, e.g. ``"Ġworld"``), None when out of range."""
        return self._special.id_to_token(token_id)
