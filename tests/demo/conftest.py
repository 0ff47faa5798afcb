"""Demo tests run pygame on SDL's dummy video driver (no display) against a real server subprocess."""

from __future__ import annotations

import os

os.environ["SDL_VIDEODRIVER"] = "dummy"  # before pygame initialises video
os.environ["SDL_AUDIODRIVER"] = "dummy"
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pygame")

from npctalk.demo.config import DemoConfig
from npctalk.demo.game import Game
from demo_helpers import LONG_REPLY
from server_process import LONG_STREAMS, ServerProcess, free_tcp_endpoint


@pytest.fixture(autouse=True)
def demo_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own NPCTALK_HOME: the demo's server log, memory and screenshots stay in tmp."""
    home = tmp_path / "npctalk-home"
    monkeypatch.setenv("NPCTALK_HOME", str(home))
    return home


@pytest.fixture
def server(gpt2_bundle: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    """A real ``npctalk serve`` on the tiny GPT-2 whose greedy replies run to their length (up to
    ``LONG_REPLY_TOKENS``)."""
    proc = ServerProcess(gpt2_bundle, tmp_path, *LONG_STREAMS, *LONG_REPLY).start()
    yield proc
    proc.stop()


@pytest.fixture
def make_game() -> Iterator[Callable[..., Game]]:
    """``make_game(**DemoConfig fields)``: a Game, closed (and its server stopped) after the test."""
    games: list[Game] = []

    def make(**fields: Any) -> Game:
        fields.setdefault("endpoint", free_tcp_endpoint())
        fields.setdefault("autostart", False)
        game = Game(DemoConfig(**fields))
        games.append(game)
        return game

    yield make
    for game in games:
        server = game.link.server
        process = server.process if server is not None else None
        game.close()
        assert process is None or process.poll() is not None, "closing the game left its server running"
