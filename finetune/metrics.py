"""Corpus metrics on reply strings: BLEU and chrF (sacrebleu), Dist-1/Dist-2, average length. Torch-free.

Shapes, as Hugging Face ``evaluate`` takes them: ``predictions`` is ``list[str]``, one reply per
example; ``references`` is ``list[list[str]]``, the reference replies of each example (usually one).
BLEU and chrF are sacrebleu's corpus scores on a 0-100 scale, computed on whole strings with
sacrebleu's own tokenization (13a for BLEU).

The word-list mistake: the recipe this package replaces passed ``generated.split()`` (lists of words)
where strings belong. ``evaluate``'s BLEU rejected that, and the workaround scored 0.004. Here any
word list, a bare string, or mismatched lengths raise ``MetricInputError`` saying exactly that.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .errors import MetricInputError

_WORDS = re.compile(r"\w+|[^\w\s]")  # words and single punctuation marks, for Dist-n and lengths
WORD_LIST_HINT = (
    "BLEU and chrF take whole reply strings, not lists of words: pass the generated text itself, not "
    "text.split() (scoring word lists is the recipe's old mistake, which scored BLEU 0.004)."
)


def check_corpus(predictions: Any, references: Any) -> tuple[list[str], list[list[str]]]:
    """Validate the shapes; return them as lists. ``MetricInputError`` explains any misuse."""
    if isinstance(predictions, str) or not isinstance(predictions, Sequence):
        raise MetricInputError(f"predictions must be a list of strings (one reply per example), got "
                               f"{type(predictions).__name__}. " + WORD_LIST_HINT)
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise MetricInputError(f"references must be a list of lists of strings, got {type(references).__name__}.")
    for i, pred in enumerate(predictions):
        if isinstance(pred, (list, tuple)):
            raise MetricInputError(f"predictions[{i}] is a list of {len(pred)} words ({list(pred)[:4]}…), not a "
                                   "string. " + WORD_LIST_HINT)
        if not isinstance(pred, str):
            raise MetricInputError(f"predictions[{i}] must be a string, got {type(pred).__name__}.")
    if len(predictions) != len(references):
        raise MetricInputError(
            f"{len(predictions)} predictions but {len(references)} reference lists; they must pair up one to one. "
            "A count that equals a reply's word count usually means one reply was split into words. " + WORD_LIST_HINT)
    refs: list[list[str]] = []
    for i, group in enumerate(references):
        if isinstance(group, str):
            raise MetricInputError(f"references[{i}] is a string; each example needs a list of reference strings, "
                                   "e.g. references=[[ref] for ref in refs].")
        if not isinstance(group, Sequence) or not group:
            raise MetricInputError(f"references[{i}] must be a non-empty list of reference strings.")
        for j, ref in enumerate(group):
            if isinstance(ref, (list, tuple)):
                raise MetricInputError(f"references[{i}][{j}] is a list of words ({list(ref)[:4]}…), not a string. "
                                       + WORD_LIST_HINT)
            if not isinstance(ref, str):
                raise MetricInputError(f"references[{i}][{j}] must be a string, got {type(ref).__name__}.")
        refs.append(list(group))
    if not predictions:
        raise MetricInputError("No predictions to score.")
    return list(predictions), refs


def _streams(refs: list[list[str]]) -> list[list[str]]:
    """sacrebleu wants reference *streams* (k-th reference of every example); pad short groups with ''."""
    width = max(len(group) for group in refs)
    return [[group[k] if k < len(group) else "" for group in refs] for k in range(width)]


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu, 13a tokenization), 0-100."""
    import sacrebleu

    preds, refs = check_corpus(predictions, references)
    return float(sacrebleu.corpus_bleu(preds, _streams(refs)).score)


def corpus_chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus chrF (sacrebleu, character 6-grams, β = 2), 0-100."""
    import sacrebleu

    preds, refs = check_corpus(predictions, references)
    return float(sacrebleu.corpus_chrf(preds, _streams(refs)).score)


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks: ``"Mind the sparks, friend!"`` → 6 items."""
    return _WORDS.findall(text.lower())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Dist-n (Li et al., 2016): distinct n-grams / all n-grams over every text, in [0, 1]; 0.0 when none."""
    if n < 1:
        raise MetricInputError(f"n must be >= 1, got {n}.")
    if isinstance(texts, str):
        raise MetricInputError("distinct_n takes a list of reply strings, not one string.")
    grams = [tuple(ws[i:i + n]) for text in texts for ws in [words(text)] for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def average_length(texts: Sequence[str]) -> float:
    """Mean reply length in words (``words``); 0.0 for no texts."""
    if isinstance(texts, str):
        raise MetricInputError("average_length takes a list of reply strings, not one string.")
    return sum(len(words(t)) for t in texts) / len(texts) if texts else 0.0
