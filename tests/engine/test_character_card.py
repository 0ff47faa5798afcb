"""Character Card V2 import/export: field mapping, {{char}}/{{user}}, lorebook, round trips, errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from npctalk.engine.character_card import from_card, load_card, to_card
from npctalk.engine.dialogue import Turn
from npctalk.engine.errors import PromptError
from npctalk.engine.model import Model
from npctalk.engine.npcs import NpcRegistry, PromptBuilder
from npctalk.engine.persona import BUILTIN_DIR, Persona, builtin_personas, find_persona

WREN = BUILTIN_DIR / "wren.json"


def wren_card() -> dict[str, Any]:
    return json.loads(WREN.read_text(encoding="utf-8"))


def test_card_fields_map_onto_the_persona() -> None:
    card = wren_card()
    wren = load_card(WREN)
    data = card["data"]
    assert (wren.name, wren.description, wren.scenario) == (data["name"], data["description"], data["scenario"])
    assert wren.traits == (data["personality"],) and wren.greeting == data["first_mes"]
    assert wren.role == data["extensions"]["npctalk"]["role"]
    assert wren.post_history == data["post_history_instructions"] and wren.system_override == data["system_prompt"]
    assert wren.alternate_greetings == tuple(data["alternate_greetings"]) and wren.tags == tuple(data["tags"])
    assert [e.keys for e in wren.lorebook] == [tuple(e["keys"]) for e in data["character_book"]["entries"]]
    assert wren.extensions["depth_prompt"] == {"prompt": "", "depth": 4}, "unknown extensions are kept verbatim"
    assert "npctalk" not in wren.extensions, "npctalk's own block is applied, not stored twice"


def test_char_and_user_are_substituted_with_the_players_name() -> None:
    wren = find_persona("wren")
    prompt = wren.system_prompt("Mira")
    assert "{{" not in prompt and "Mira wants to cross" in prompt and prompt.count("Wren") >= 3
    assert "Reply in one to three short sentences. Wren never leaves the river" in prompt, "{{original}} kept"
    turns = wren.leading_turns("Mira")
    assert ("user", "Is the river safe today?") in turns, "mes_example lines become example turns"
    assert turns[-1] == ("assistant", "Two coppers to cross, Mira. Keep your hands inside the boat; the river bites.")
    assert wren.post_history_text("Ola") == "Answer as Wren would, in one or two short sentences."
    assert "<START>" not in prompt and "Example dialogue:\nMira: Is the river safe today?" in prompt


def test_card_round_trips_with_unknown_fields_kept() -> None:
    card = wren_card()
    card["data"]["x_future_field"] = {"nested": [1, 2]}
    card["top_level_v1_copy"] = "kept"
    card["data"]["character_book"]["entries"][0]["extensions"] = {"tool": {"weight": 3}}
    persona = from_card(copy.deepcopy(card))
    assert to_card(persona) == card
    assert to_card(from_card(to_card(persona))) == card


@pytest.mark.parametrize("key", ["bram", "elda", "tobin"])
def test_toml_persona_survives_a_trip_through_a_card(key: str) -> None:
    persona = builtin_personas()[key]
    card = json.loads(json.dumps(to_card(persona)))  # as a file would hold it
    assert card["spec"] == "chara_card_v2" and card["data"]["name"] == persona.name
    assert from_card(card) == persona


def test_per_npc_sampling_travels_in_the_card() -> None:
    persona = Persona.from_dict({**builtin_personas()["bram"].to_dict(), "sampling": {"temperature": 0.3, "top_k": 20}})
    card = json.loads(json.dumps(to_card(persona)))
    assert card["data"]["extensions"]["npctalk"]["sampling"] == {"temperature": 0.3, "top_k": 20}
    assert from_card(card) == persona and from_card(card).sampling == persona.sampling


def test_upsert_map_and_to_dict_read_back_the_same_persona() -> None:
    wren = Persona.from_dict(wren_card(), source="upsert")  # npc.upsert passes the card map as is
    assert wren == find_persona("wren")
    assert Persona.from_dict(wren.to_dict()) == wren


def _broken(path: list[str | int], value: Any) -> dict[str, Any]:
    card = wren_card()
    target: Any = card
    for step in path[:-1]:
        target = target[step]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return card


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["spec"], "chara_card_v3", "'spec'"),
        (["data"], "Wren", "'data'"),
        (["data", "name"], "  ", "'data.name'"),
        (["data", "personality"], 7, "'data.personality'"),
        (["data", "tags"], "ferry", "'data.tags'"),
        (["data", "extensions"], [], "'data.extensions'"),
        (["data", "extensions", "npctalk"], {"favourite": 1}, "'data.extensions.npctalk'"),
        (["data", "character_book", "entries"], {}, "'data.character_book'"),
        (["data", "character_book", "entries", 1, "keys"], "toll", r"entries\[1\]: field 'keys'"),
        (["data", "character_book", "entries", 0, "content"], KeyError, r"entries\[0\]: field 'content'"),
        (["data", "character_book", "entries", 0, "enabled"], "yes", r"entries\[0\]: field 'enabled'"),
        (["data", "extensions", "npctalk", "rerank"], {"candidates": 99}, "rerank.candidates"),
    ],
)
def test_bad_card_fields_are_named(path: list[str | int], value: Any, message: str) -> None:
    with pytest.raises(PromptError, match=message):
        from_card(_broken(path, value), source="card")


def test_bad_card_files(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(PromptError, match="not valid JSON"):
        load_card(tmp_path / "broken.json")
    with pytest.raises(PromptError, match="does not exist"):
        load_card(tmp_path / "none.json")


def test_cards_load_from_a_persona_folder_beside_toml(tmp_path: Path) -> None:
    card = wren_card()
    card["data"]["name"] = "Other Wren"
    (tmp_path / "ferry.json").write_text(json.dumps(card), encoding="utf-8")
    (tmp_path / "guard.toml").write_text('name = "Hal"\nrole = "a guard"', encoding="utf-8")
    registry = NpcRegistry.with_builtins(tmp_path)
    assert registry.get("ferry").name == "Other Wren" and registry.get("guard").name == "Hal"  # type: ignore[union-attr]
    assert registry.get("wren").name == "Wren"  # type: ignore[union-attr]
    assert find_persona("FERRY", tmp_path).name == "Other Wren"


def test_lorebook_entries_enter_the_prompt_after_the_persona_prefix(model: Model) -> None:
    wren = find_persona("wren")
    builder = PromptBuilder(model.manifest, model.tokenizer)
    prefix = builder.persona_prefix(wren, "Mira")
    decode = model.tokenizer.decode
    plain = builder.build(wren, [], "Good morning.", {}, 16, player="Mira")
    asked = builder.build(wren, [], "What is the toll?", {}, 16, player="Mira")
    earlier = builder.build(wren, [Turn("user", "Any eels about?"), Turn("assistant", "Hush.")], "Fine.", {}, 16,
                            player="Mira")
    assert plain[:len(prefix)] == asked[:len(prefix)] == earlier[:len(prefix)] == prefix
    toll, eel = "two coppers a head", "great eel"
    assert toll not in decode(plain) and eel not in decode(plain)
    assert toll in decode(asked[len(prefix):]) and eel not in decode(asked)
    assert eel in decode(earlier[len(prefix):]), "keys are looked for in recent turns too"
    bridge = builder.build(wren, [], "What happened to the bridge?", {}, 16, player="Mira")
    assert "fell in the flood" not in decode(bridge), "disabled entries never enter"


def test_post_history_instructions_follow_the_dialogue_on_chat_models(llama_model: Model) -> None:
    wren = find_persona("wren")
    builder = PromptBuilder(llama_model.manifest, llama_model.tokenizer)
    text = llama_model.tokenizer.decode(builder.build(wren, [], "Hello there", {}, 16, player="Mira"),
                                        skip_special_tokens=False)
    assert text.index("Hello there") < text.index("Answer as Wren would") < text.rindex("<|im_start|>assistant")
    assert text.endswith("<|im_start|>assistant\n")
