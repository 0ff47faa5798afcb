"""JSONL examples: the shipped dataset loads, and every malformed line is reported as file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from npctalk.engine.persona import builtin_personas
from npctalk.finetune.dataset import load_examples
from npctalk.finetune.errors import DatasetError

from npc_data import DATA

GOOD = json.dumps({"persona": "bram", "prompt": "Got iron?", "completion": "Not a scrap, friend."})


def test_shipped_dataset_has_300_pairs_in_disjoint_splits_across_personas() -> None:
    splits = {name: load_examples(DATA / f"{name}.jsonl") for name in ("train", "valid", "test")}
    everything = [e for examples in splits.values() for e in examples]
    assert len(everything) >= 300
    assert all(splits[name] for name in splits)
    keys = {name: {(e.persona.name if e.persona else "", e.prompt, e.completion) for e in ex} for name, ex in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["valid"] and not keys["valid"] & keys["test"]
    names = {e.persona.name for e in everything if e.persona}
    builtins = builtin_personas()
    assert {builtins[k].name for k in ("bram", "elda", "tobin")} <= names and len(names) >= 5
    assert any(e.history for e in everything) and any(e.context for e in everything)
    assert all(e.persona is not None for e in everything)


def test_example_fields_are_read(tmp_path: Path) -> None:
    line = {"persona": "tobin", "context": {"location": "the gate"}, "prompt": " Whose footprints? ",
            "history": [{"role": "user", "text": "Caught the sneak?"}, {"role": "assistant", "text": "Not yet."}],
            "completion": "Small ones, traveller."}
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(line) + "\n\n", encoding="utf-8")
    (example,) = load_examples(path)
    assert example.persona is not None and example.persona.name == "Tobin"
    assert [(t.role, t.text) for t in example.history] == [("user", "Caught the sneak?"), ("assistant", "Not yet.")]
    assert example.prompt == "Whose footprints?" and example.context == {"location": "the gate"}
    assert example.where == f"{path}:2"


def test_dataset_personas_folder_next_to_the_file_is_used() -> None:
    wynn = next(e for e in load_examples(DATA / "train.jsonl") if e.persona and e.persona.name == "Wynn")
    assert "ferry" in wynn.persona.role  # type: ignore[union-attr]


def test_inline_persona(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"persona": {"name": "Pip", "role": "a goat"}, "prompt": "Hi", "completion": "Baa."}),
                    encoding="utf-8")
    assert load_examples(path)[0].persona.name == "Pip"  # type: ignore[union-attr]


@pytest.mark.parametrize(("bad", "says"), [
    ('{"persona": "bram", "prompt": "Hi", "completion": "Hello"', "not valid JSON"),
    ('["Hi", "Hello"]', "expected a JSON object"),
    ('{"prompt": "Hi"}', "'completion' must be a non-empty string"),
    ('{"prompt": "  ", "completion": "Hello"}', "'prompt' must be a non-empty string"),
    ('{"prompt": "Hi", "completion": "Hello", "reply": "x"}', "unknown field(s) ['reply']"),
    ('{"prompt": "Hi", "completion": "Hello", "history": [{"role": "npc", "text": "x"}]}', "history[0].role"),
    ('{"prompt": "Hi", "completion": "Hello", "history": "earlier"}', "'history' must be a list"),
    ('{"prompt": "Hi", "completion": "Hello", "persona": "nobody"}', "No persona named 'nobody'"),
    ('{"prompt": "Hi", "completion": "Hello", "persona": {"role": "x"}}', "'name' is required"),
    ('{"prompt": "Hi", "completion": "Hello", "context": ["x"]}', "'context' must be an object"),
])
def test_malformed_line_names_file_and_line(tmp_path: Path, bad: str, says: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([GOOD, "", GOOD, bad, GOOD]) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError) as info:
        load_examples(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4: "), message
    assert says in message


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="holds no examples"):
        load_examples(empty)
