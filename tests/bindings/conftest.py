"""Fixtures of the C client tests: the CMake build (once per session) and a real server per module."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from c_harness import MISSING, Built, build  # noqa: E402
from server_process import LONG_STREAMS, ServerProcess  # noqa: E402


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    if MISSING is not None:
        pytest.skip(f"C client not buildable: {MISSING}")
    return build(tmp_path_factory.mktemp("c-build"))


@pytest.fixture(scope="module")
def server(gpt2_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Its memory lives in the module's temp folder: conversations of earlier runs never lengthen prompts."""
    folder = tmp_path_factory.mktemp("server")
    proc = ServerProcess(gpt2_bundle, folder, *LONG_STREAMS, "--max-new-tokens", "600",
                         "--memory-db", str(folder / "memory.sqlite3")).start()
    try:
        yield proc
    finally:
        proc.stop()
