"""Reranking: overlap and reverse-likelihood scores, the batched scorer equals one-at-a-time scoring,
and ChatSession returns the best of its sampled candidates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from server_process import LONG_STREAMS, ServerProcess

from npctalk.client import Client

from npctalk.engine.chat import ChatSession
from npctalk.engine.dialogue import DialogueFormatter, Turn
from npctalk.engine.errors import ConfigError
from npctalk.engine.grounding import Grounding, grounding_score
from npctalk.engine.model import Model
from npctalk.engine.persona import find_persona
from npctalk.engine.rerank import (RerankConfig, best_index, likelihood_scores, overlap_score, persona_statement,
                                   score_candidates)
from npctalk.engine.sampling import SearchOptions


def test_overlap_prefers_replies_that_use_the_persona_and_punishes_breaking_character() -> None:
    bram = find_persona("bram")
    on = overlap_score("Thirty years at this forge in Ashford, friend; a blacksmith knows iron.", bram)
    generic = overlap_score("I don't know what you mean.", bram)
    ooc = overlap_score("As an AI language model I cannot forge anything.", bram)
    assert on > generic > ooc
    assert generic == 0.0


def test_config_validation_names_the_setting() -> None:
    assert not RerankConfig().enabled and RerankConfig(candidates=2).enabled
    with pytest.raises(ConfigError, match="candidates"):
        RerankConfig(candidates=0)
    with pytest.raises(ConfigError, match="method"):
        RerankConfig(method="vibes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="overlap_weight"):
        RerankConfig(overlap_weight=-1)
    assert best_index([0.5, 2.0, 2.0, -1.0]) == 1


def _reference_score(model: Model, formatter: DialogueFormatter, reply: str, statement: str) -> float:
    """Mean log p(statement | reply), one sequence alone, fed one token at a time."""
    ids = formatter.turn_ids(Turn("assistant", reply)) + formatter.turn_ids(Turn("user", "Who are you?"))
    target = formatter.generation_prompt_ids() + model.tokenizer.encode(statement)
    cache = model.new_cache(1)
    logits = model.forward(np.asarray([ids]), cache)
    total = 0.0
    for position, token in enumerate(target):
        if position:
            logits = model.forward(np.asarray([[target[position - 1]]]), cache)
        row = logits[0].astype(np.float64)
        total += row[token] - (np.log(np.exp(row - row.max()).sum()) + row.max())
    return total / len(target)


def test_batched_reverse_scores_equal_scoring_each_reply_alone(model: Model) -> None:
    bram = find_persona("bram")
    formatter = DialogueFormatter(model.manifest, model.tokenizer)
    replies = ["Mind the sparks.", "I forge swords and horseshoes for the whole village of Ashford.", "No."]
    scores = likelihood_scores(model, formatter, replies, bram)
    expected = [_reference_score(model, formatter, r, persona_statement(bram)) for r in replies]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert len(set(np.round(scores, 6))) == 3, "different replies get different scores"
    both = score_candidates(model, formatter, replies, bram, RerankConfig(candidates=3, method="both",
                                                                          overlap_weight=2.0))
    assert both == pytest.approx([s + 2.0 * overlap_score(r, bram) for s, r in zip(scores, replies)])
    grounding = Grounding.build(bram, "What is your name?")
    named = ["Bram, friend.", "I am Grimbold Ironfrost.", "As an AI, I have no name."]
    plain = score_candidates(model, formatter, named, bram, RerankConfig(candidates=3, method="both"))
    grounded = score_candidates(model, formatter, named, bram, RerankConfig(candidates=3, grounding_weight=3.0),
                                grounding)
    assert grounded == pytest.approx([p + 3.0 * grounding_score(r, grounding) for p, r in zip(plain, named)])
    assert best_index(grounded) == 0, "the grounded answer wins over an invented name and breaking character"
    assert score_candidates(model, formatter, named, bram, RerankConfig(candidates=3)) == pytest.approx(plain), \
        "without a grounding the grounded method is likelihood + overlap"


def test_chat_session_returns_the_best_sampled_candidate(model: Model) -> None:
    options = SearchOptions(max_new_tokens=10, do_sample=True, temperature=1.0, top_k=0, seed=7)
    session = ChatSession(model, find_persona("bram"), options, rerank=RerankConfig(candidates=4))
    chunks = list(session.say("Who are you?"))
    texts = [t for t, _ in session.candidates]
    scores = [s for _, s in session.candidates]
    assert len(texts) == 4 and len(set(texts)) > 1, "candidates are sampled, not copies"
    assert "".join(chunks) == texts[best_index(scores)]
    assert session.history[-1] == Turn("assistant", texts[best_index(scores)].strip())
    again = ChatSession(model, find_persona("bram"), options, rerank=RerankConfig(candidates=4))
    assert list(again.say("Who are you?")) == chunks, "same seed, same candidates, same choice"


def test_the_server_streams_a_reranked_say_once_chosen(gpt2_bundle: Path, tmp_path: Path) -> None:
    server = ServerProcess(gpt2_bundle, tmp_path, *LONG_STREAMS, "--memory-db", ":memory:").start()
    try:
        with Client(server.endpoint) as client:
            persona = {**client.get_npc("bram"), "rerank": {"candidates": 3, "method": "both"}}
            client.upsert_npc("bram3", persona)
            replies = []
            for player in ("p1", "p2"):
                reply = client.say("bram3", "Who are you?", player=player, max_new_tokens=12, seed=5)
                chunks = list(reply)
                replies.append((chunks, reply.wait()))
            (chunks, result), (again, _) = replies
            assert len(chunks) <= 1 and "".join(chunks) == result.text, "one message with the chosen text"
            assert chunks == again, "same seed, same candidates, same choice"
            assert result.usage.completion_tokens >= 1
            stats = client.stats()
            assert stats["completed"] == 2 and stats["active"] == 0, "candidates are not counted as says"
    finally:
        server.stop()
