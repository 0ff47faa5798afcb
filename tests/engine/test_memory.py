"""Short-term fitting, the rolling summary, fact extraction and retrieval (no database, no model)."""

from __future__ import annotations

import pytest

from npctalk.engine.dialogue import Turn
from npctalk.engine.errors import ConfigError, PromptError
from npctalk.engine.facts import Fact, extract_facts, game_fact, keywords, retrieve
from npctalk.engine.memory import MemoryConfig, Recall, fit_turns, fold_summary


def ids(turn: Turn) -> list[int]:
    """One token per word, so budgets are easy to count."""
    return [len(w) for w in turn.text.split()]


def test_fit_turns_drops_oldest_whole_turns_and_opens_with_a_player_line() -> None:
    history = [Turn("user" if i % 2 == 0 else "assistant", " ".join(["w"] * 3)) for i in range(10)]
    tail = [9, 9]
    assert fit_turns(ids, history, tail, 1000) == [1] * 30 + tail  # everything fits
    fitted = fit_turns(ids, history, tail, 14)  # 12 tokens of history fit: 4 turns
    assert fitted == [1] * 12 + tail
    fitted = fit_turns(ids, history, tail, 11)  # 9 would fit 3 turns, but then it opens with an NPC line
    assert fitted == [1] * 6 + tail
    assert fit_turns(ids, history, tail, 2) == tail  # no history at all
    with pytest.raises(PromptError, match="at most 1 fit"):
        fit_turns(ids, history, tail, 1)  # the tail itself is never cut


@pytest.mark.parametrize(("line", "expected"), [
    ("My name is Mira.", ["The player's name is Mira."]),
    ("call me Old Tom, everyone does", ["The player's name is Old Tom."]),
    ("Hi, I'm Mira from Eastwatch and I bought the iron sword.",
     ["The player's name is Mira.", "The player is from Eastwatch.", "The player bought the iron sword."]),
    ("I have two goats and a cow.", ["The player has two goats."]),
    ("I found my father's ring!", ["The player found their father's ring."]),
    ("I'm a carpenter.", ["The player is a carpenter."]),
    ("My brother is Tom.", ["The player's brother is Tom."]),
    ("I live in the old mill", ["The player lives in the old mill."]),
    ("Hello! I came from Dunmore to buy a plough.", ["The player is from Dunmore.", "The player came to buy a plough."]),
    ("I'm here to sell my goat", ["The player came to sell their goat."]),
    ("I'm looking for fresh eels, and quick.", ["The player is looking for fresh eels."]),
    ("I am after a good bow", ["The player is looking for a good bow."]),
    ("I'm looking for you.", []),

    ("I came here yesterday.", []),  # no place after "from", no errand after "to"
    ("I'm tired.", []),              # not a name: names start with a capital
    ("I'm Sorry about that.", []),   # a capital, but not a name
    ("I have to go", []),
    ("What do you sell?", []),
])
def test_fact_extraction(line: str, expected: list[str]) -> None:
    assert [f.text for f in extract_facts(line)] == expected
    assert extract_facts(line) == extract_facts(line)  # deterministic


def test_name_facts_are_marked_and_game_facts_are_checked() -> None:
    assert [f.kind for f in extract_facts("I'm Mira from Eastwatch")] == ["name", "origin"]
    assert game_fact("  the player  saved the mill ").text == "the player saved the mill."
    assert game_fact("The player's name is Ada.").kind == "name"
    with pytest.raises(ValueError, match="non-empty"):
        game_fact("   ")
    with pytest.raises(ValueError, match="at most 300"):
        game_fact("x" * 301)


def fact(i: int, text: str, kind: str = "other", created: float = 0.0) -> Fact:
    return Fact(i, text, kind, "dialogue", created or float(i), keywords(text))


def test_retrieval_by_keyword_overlap_always_includes_the_name() -> None:
    facts = [fact(1, "The player's name is Mira.", "name"), fact(2, "The player bought the iron sword."),
             fact(3, "The player has two goats."), fact(4, "The player lost a silver ring."),
             fact(5, "The player wants a new sword and iron nails.")]
    chosen = retrieve(facts, keywords("Is my iron sword any good?"), limit=3)
    assert [f.id for f in chosen] == [1, 2, 5]  # name always; then by overlap; oldest first in the prompt
    assert [f.id for f in retrieve(facts, keywords("Nice weather"), limit=3)] == [1]  # nothing relevant
    assert [f.id for f in retrieve(facts, keywords("goats and rings"), limit=2)] == [1, 4]  # a tie: the newer
    assert len(retrieve(facts, keywords("sword iron goats ring"), limit=10)) == 5


def test_where_the_player_comes_from_is_recalled_like_the_name() -> None:
    """'Which town did I come from?' shares no keyword with 'The player is from Dunmore.'"""
    facts = [fact(1, "The player's name is Mira.", "name"), fact(2, "The player is from Dunmore.", "origin"),
             fact(3, "The player came to buy a plough.")]
    chosen = retrieve(facts, keywords("And which town did I tell you I came from?"), limit=3)
    assert [f.id for f in chosen] == [1, 2, 3]
    assert [f.id for f in retrieve(facts, keywords("Nice weather"), limit=3)] == [1, 2]


def test_keywords_are_content_words() -> None:
    assert keywords("The player bought the Iron Swords!") == ("bought", "iron", "sword")


def test_summary_folds_key_sentences_and_drops_the_oldest_beyond_its_size() -> None:
    summary = fold_summary("", [("Hello there. I need forty iron nails for the new barn roof.", "Forty? Come back "
                                 "tomorrow.")], 1000)
    assert summary == 'Player: "I need forty iron nails for the new barn roof." You: "Come back tomorrow."'
    longer = fold_summary(summary, [(f"Question {i} about the harvest festival?", f"Answer {i}.") for i in range(20)], 200)
    assert len(longer) <= 200 and "Question 19" in longer and "nails" not in longer
    assert fold_summary("", [("x" * 500, "ok")], 1000).count("x") < 130  # quotes are shortened


def test_recall_notes() -> None:
    assert Recall().notes() == []
    notes = Recall((fact(1, "The player's name is Mira.", "name"),), "Player: \"hi\"").notes()
    assert [q for q, _ in notes] == ["Do you remember me?", "What did we talk about before?"]
    assert "The player's name is Mira." in notes[0][1] and 'Player: "hi"' in notes[1][1]


def test_memory_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="recent_turns"):
        MemoryConfig(recent_turns=3)
    with pytest.raises(ConfigError, match="max_facts"):
        MemoryConfig(max_facts=0)


def test_a_fact_is_recalled_by_the_topic_its_form_states() -> None:
    """'What did I say my trade was?' shares no keyword with 'The player is a carpenter.'; both are work."""
    from npctalk.engine.facts import fact_topics
    from npctalk.engine.grounding import asked_topics

    assert fact_topics("The player is a carpenter.") == {"work"}
    assert fact_topics("The player needs two sacks of rye flour.") == {"want"}
    assert fact_topics("The player lives in Millbrook.") == {"home"}
    assert fact_topics("The player's brother is Tom.") == frozenset()
    facts = [fact(1, "The player's name is Kael.", "name"), fact(2, "The player is a carpenter."),
             fact(3, "The player needs two sacks of rye flour."), fact(4, "The player's brother is Tom.")]
    for line, expected in (("What did I say my trade was?", [1, 2]), ("And what did I come here for?", [1, 3]),
                           ("Nice weather today.", [1])):
        chosen = retrieve(facts, keywords(line), limit=3, topics=asked_topics(line))
        assert [f.id for f in chosen] == expected, line
    assert [f.id for f in retrieve(facts, keywords("What did I say my trade was?"), limit=3)] == [1]  # no topics
