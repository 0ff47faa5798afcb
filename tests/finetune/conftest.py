"""Fine-tuning fixtures: small JSONL files cut from the shipped dataset (built-in personas only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from npc_data import dataset_lines, write_jsonl


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train.jsonl, valid.jsonl): 8 and 4 real examples, one with history and one with context."""
    folder = tmp_path_factory.mktemp("npc-data")
    return (write_jsonl(folder / "train.jsonl", dataset_lines("train", 8, with_history=True)),
            write_jsonl(folder / "valid.jsonl", dataset_lines("valid", 4)))
