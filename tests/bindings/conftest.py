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
    proc = ServerProcess(gpt2_bundle, tmp_path_factory.mktemp("server"), *LONG_STREAMS, "--max-new-tokens", "600").start()
    try:
        yield proc
    finally:
        proc.stop()
