"""Metrics on strings: BLEU's word-list regression, and hand-checkable Dist-n and lengths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from npctalk.finetune.errors import MetricInputError
from npctalk.finetune.metrics import average_length, corpus_bleu, corpus_chrf, distinct_n, words

REPLIES = ["Mind the sparks, friend.", "Steel remembers every strike.", "Four coppers a shoe, sixteen for the set."]


def test_identical_strings_score_100_and_different_ones_less() -> None:
    refs = [[r] for r in REPLIES]
    assert corpus_bleu(REPLIES, refs) == pytest.approx(100.0)
    assert corpus_chrf(REPLIES, refs) == pytest.approx(100.0)
    partial = ["Mind the sparks, stranger.", "Steel forgets every strike.", "Four coppers a shoe, twenty for the set."]
    assert 0.0 < corpus_bleu(partial, refs) < 100.0
    assert 0.0 < corpus_chrf(partial, refs) < 100.0


def test_word_list_mistake_is_caught_with_a_clear_message() -> None:
    """The recipe passed generated.split(); that must fail loudly, not score 0.004."""
    generated = "Mind the sparks, friend."
    with pytest.raises(MetricInputError) as info:
        corpus_bleu([generated.split()], [[generated.split()]])  # type: ignore[list-item]
    message = str(info.value)
    assert "predictions[0] is a list of 4 words" in message and "text.split()" in message and "0.004" in message
    with pytest.raises(MetricInputError, match=r"references\[0\]\[0\] is a list of words"):
        corpus_bleu([generated], [[generated.split()]])  # type: ignore[list-item]
    with pytest.raises(MetricInputError, match="split into words"):
        corpus_bleu(generated.split(), [[generated]])  # one reply's words as a corpus: counts do not pair up
    with pytest.raises(MetricInputError, match="list of strings"):
        corpus_chrf(generated, [[generated]])  # type: ignore[arg-type]
    with pytest.raises(MetricInputError, match=r"references\[0\] is a string"):
        corpus_bleu([generated], [generated])  # type: ignore[list-item]


def test_several_references_per_example() -> None:
    preds = ["Mind the sparks, friend."]
    assert corpus_bleu(preds, [["Go away.", "Mind the sparks, friend."]]) == pytest.approx(100.0)
    assert corpus_bleu(preds, [["Go away."]]) < 100.0


def test_words_and_lengths_by_hand() -> None:
    assert words("Mind the sparks, friend!") == ["mind", "the", "sparks", ",", "friend", "!"]
    assert average_length(["a b c", "d"]) == pytest.approx(2.0)
    assert average_length([]) == 0.0


def test_distinct_n_by_hand() -> None:
    texts = ["the cat the cat", "the dog"]
    # unigrams: the cat the cat the dog → 6 total, {the, cat, dog} = 3 distinct
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    # bigrams: (the cat) (cat the) (the cat) | (the dog) → 4 total, 3 distinct; none cross texts
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["word"], 2) == 0.0
    with pytest.raises(MetricInputError):
        distinct_n("the cat", 1)
    with pytest.raises(MetricInputError):
        distinct_n(texts, 0)


def test_scoring_side_is_torch_free(tmp_path: Path) -> None:
    """Evaluation runs where only the runtime is installed: importing it must not pull torch."""
    probe = ("import sys, json; import npctalk.finetune.cli, npctalk.finetune.evaluate, npctalk.finetune.prompts; "
             "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
