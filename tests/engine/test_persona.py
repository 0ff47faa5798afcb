"""Personas: TOML loading, validation naming the bad field, prompt rendering."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import msgpack
import pytest

from npctalk.engine.errors import PromptError
from npctalk.engine.model import Model
from npctalk.engine.persona import Persona, builtin_personas, find_persona


def test_builtin_personas_load_and_differ() -> None:
    personas = builtin_personas()
    assert {"bram", "elda", "tobin"} <= set(personas)
    prompts = {p.system_prompt() for p in personas.values()}
    assert len(prompts) == len(personas)
    bram = personas["bram"]
    assert bram.system_prompt().startswith("You are Bram, the blacksmith")
    for fact in bram.background:
        assert fact in bram.system_prompt()


def test_leading_turns_alternate_and_carry_identity() -> None:
    turns = find_persona("Bram").leading_turns()
    roles = [r for r, _ in turns]
    assert roles[::2] == ["user"] * (len(turns) // 2) and roles[1::2] == ["assistant"] * (len(turns) // 2)
    assert "Bram" in turns[1][1]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('role = "a guard"', "name"),
        ('name = "A"\nrole = 3', "role"),
        ('name = "A"\nrole = "b"\ntraits = "brave"', "traits"),
        ('name = "A"\nrole = "b"\nfavourite_colour = "red"', "favourite_colour"),
    ],
)
def test_bad_persona_names_the_field(tmp_path: Path, body: str, field: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(PromptError, match=field):
        Persona.load(path)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("name = \"unterminated", encoding="utf-8")
    with pytest.raises(PromptError, match="not valid TOML"):
        Persona.load(path)
    with pytest.raises(PromptError, match="does not exist"):
        Persona.load(tmp_path / "nope.toml")


def test_find_persona_prefers_folder_and_lists_choices(tmp_path: Path) -> None:
    (tmp_path / "bram.toml").write_text('name = "Other Bram"\nrole = "a baker"', encoding="utf-8")
    assert find_persona("BRAM", tmp_path).name == "Other Bram"
    with pytest.raises(PromptError, match="available: .*elda"):
        find_persona("nobody", tmp_path)


FULL = '''
name = "Hal"
role = "a gate guard of {{user}}'s town"
scenario = "Night watch at the east gate."
post_history = "Stay terse, {{char}}."
system_override = "Be Hal. {{original}}"
example_dialogue = "<START>\\n{{user}}: Open up!\\n{{char}}: Not after dark."
[[lorebook]]
keys = ["Duke"]
content = "The Duke of {{user}}'s town is ill."
case_sensitive = true
[[lorebook]]
keys = []
content = "The gate closes at sunset."
constant = true
insertion_order = -1
[rerank]
candidates = 3
method = "overlap"
'''


def test_toml_extensions_render_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "hal.toml"
    path.write_text(FULL, encoding="utf-8")
    hal = Persona.load(path)
    prompt = hal.system_prompt("Ola")
    assert "a gate guard of Ola's town" in prompt and "Scenario: Night watch" in prompt
    assert prompt.endswith("Be Hal. Stay in character as Hal at all times; never say you are an AI or a language "
                           "model. Reply in one to three short sentences.")
    assert ("assistant", "Not after dark.") in hal.leading_turns("Ola")
    assert hal.post_history_text() == "Stay terse, Hal."
    assert hal.rerank.candidates == 3 and hal.rerank.method == "overlap"
    assert hal.lore_for(["nothing here"]) == ["The gate closes at sunset."], "constant entries always enter"
    assert hal.lore_for(["the duke is late"]) == ["The gate closes at sunset."], "case-sensitive keys"
    assert hal.lore_for(["the Duke is late"], "Ola") == ["The gate closes at sunset.", "The Duke of Ola's town is ill."]
    assert hal.lore_for(["the Dukes are late"]) == ["The gate closes at sunset."], "whole words only"
    assert Persona.from_dict(hal.to_dict()) == hal


def test_lore_scans_only_recent_turns() -> None:
    hal = Persona.from_dict({"name": "Hal", "role": "a guard", "lorebook": [{"keys": ["wolf"], "content": "Wolves!"}]})
    assert hal.lore_for(["the wolf came"] + ["chat"] * 4 + ["hello"]) == [], "5 turns back: out of scan depth"
    assert hal.lore_for(["the wolf came"] + ["chat"] * 3 + ["hello"]) == ["Wolves!"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "A"}, "'role' is required"),
        ({"name": "A", "role": "b", "lorebook": {"keys": []}}, "'lorebook' must be a list"),
        ({"name": "A", "role": "b", "lorebook": [{"keys": "x", "content": "y"}]}, r"lorebook\[0\]: field 'keys'"),
        ({"name": "A", "role": "b", "lorebook": [{"keys": ["x"], "content": "y", "insertion_order": "1"}]},
         "'insertion_order'"),
        ({"name": "A", "role": "b", "rerank": {"candidates": 0}}, "rerank.candidates"),
        ({"name": "A", "role": "b", "rerank": {"method": "magic"}}, "rerank.method"),
        ({"name": "A", "role": "b", "rerank": {"beam": 2}}, "'beam'"),
        ({"name": "A", "role": "b", "extensions": []}, "'extensions'"),
        ({"name": "A", "role": "b", "sampling": {"temperature": "hot"}}, "sampling.temperature"),
        ({"name": "A", "role": "b", "sampling": {"top_k": 1.5}}, "sampling.top_k"),
        ({"name": "A", "role": "b", "sampling": {"top_p": 2.0}}, "top_p"),
        ({"name": "A", "role": "b", "sampling": {"beam": 2}}, "'beam'"),
        ({"name": "A", "role": "b", "rerank": {"grounding_weight": -1}}, "rerank.grounding_weight"),
    ],
)
def test_bad_new_fields_are_named(data: dict, message: str) -> None:
    with pytest.raises(PromptError, match=message):
        Persona.from_dict(data)


def test_substitute_handles_both_spellings() -> None:
    from npctalk.engine.persona import substitute

    assert substitute("{{char}} greets {{User}}; <BOT> to <USER>.", "Wren", "Mira") == "Wren greets Mira; Wren to Mira."
    assert substitute("Mira's {{user}}", "X", "\\1") == "Mira's \\1", "names are inserted literally"


def test_persona_sampling_sits_between_server_defaults_and_the_say(gpt2_model: Model) -> None:
    from npctalk.engine.handlers import Handlers
    from npctalk.engine.npcs import NpcRegistry
    from npctalk.engine.scheduler import Scheduler, SchedulerConfig
    from npctalk.engine.server import ServerConfig
    from npctalk.engine.store import MemoryStore

    calm = Persona.from_dict({"name": "Calm", "role": "a monk", "sampling": {"temperature": 0.3, "repetition_penalty": 1.0,
                                                                          "no_repeat_ngram_size": 0}})
    assert Persona.from_dict(calm.to_dict()) == calm, "round-trips through npc.upsert's map"
    scheduler = Scheduler(gpt2_model, SchedulerConfig(max_batch=4, max_queue=4))
    handlers = Handlers(gpt2_model, scheduler, ServerConfig(), NpcRegistry({"calm": calm, "plain": Persona("P", "a cook")}),
                        MemoryStore())
    for rid, npc, extra in (("a", "calm", {}), ("b", "calm", {"temperature": 0.9}), ("c", "plain", {})):
        frame = [msgpack.packb({"v": 1, "id": rid, "op": "say", "npc": npc, "text": "Hi", **extra}, use_bin_type=True)]
        assert handlers.handle(b"c", frame) is None
    options = {key.id: request.options for key, request in scheduler._live.items()}
    defaults = ServerConfig().defaults
    assert (options["a"].temperature, options["a"].repetition_penalty, options["a"].no_repeat_ngram_size) == (0.3, 1.0, 0)
    assert options["a"].top_p == defaults.top_p, "unset fields keep the server's default"
    assert options["b"].temperature == 0.9 and options["b"].repetition_penalty == 1.0, "the say's own field wins"
    assert options["c"] == dataclasses.replace(defaults, max_new_tokens=options["c"].max_new_tokens)
