"""Personas: TOML loading, validation naming the bad field, prompt rendering."""

from __future__ import annotations

from pathlib import Path

import pytest

from npctalk.engine.errors import PromptError
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
