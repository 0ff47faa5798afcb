"""Helpers for the fine-tuning tests: small JSONL files cut from the shipped dataset."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "data" / "npc_dialogue"
BUILTIN = ("bram", "elda", "tobin")


def dataset_lines(split: str, count: int, *, with_history: bool = False) -> list[str]:
    """The first ``count`` lines of a shipped split whose persona is built in; with ``with_history``
    the last two are replaced by training examples with earlier turns and with game context."""
    lines = [line for line in (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
             if json.loads(line).get("persona") in BUILTIN]
    chosen = lines[:count]
    if with_history:
        rows = [(line, json.loads(line)) for line in (DATA / "train.jsonl").read_text(encoding="utf-8").splitlines()]
        for i, field in ((-1, "history"), (-2, "context")):
            chosen[i] = next(line for line, row in rows if field in row and row["persona"] in BUILTIN)
    return chosen


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
