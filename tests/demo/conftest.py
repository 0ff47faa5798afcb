"""Demo tests run pygame on SDL's dummy video driver (no display) against a real server subprocess."""

from __future__ import annotations

import os

os.environ["SDL_VIDEODRIVER"] = "dummy"  # before pygame initialises video
os.environ["SDL_AUDIODRIVER"] = "dummy"
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pygame")

from npctalk.demo.config import DemoConfig
from npctalk.demo.game import Game
from npctalk.demo.script import Script, Step
from server_process import LONG_STREAMS, ServerProcess, free_tcp_endpoint


@pytest.fixture(autouse=True)
def demo_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own NPCTALK_HOME: the demo's server log, memory and screenshots stay in tmp."""
    home = tmp_path / "npctalk-home"
    monkeypatch.setenv("NPCTALK_HOME", str(home))
    return home


@pytest.fixture
def server(gpt2_bundle: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    """A real ``npctalk serve`` on the tiny GPT-2 whose greedy replies run to their length."""
    proc = ServerProcess(gpt2_bundle, tmp_path, *LONG_STREAMS).start()
    yield proc
    proc.stop()


@dataclass
class Frame:
    """What one frame showed (read after ``game.step()``)."""

    interval_s: float
    scene: str
    state: str | None       # the open dialogue's reply state
    reply: str              # the open dialogue's reply text
    thinking: bool          # the thinking indicator was drawn
    shown: list[str]        # reply lines drawn


def observe(game: Game) -> Frame:
    d = game.dialogue
    return Frame(game.stats.intervals[-1], game.scene.value, d.state.value if d else None, d.reply if d else "",
                 game.shown_thinking, list(game.shown_reply))


def run_until(game: Game, done: Callable[[Game], bool], timeout_s: float, frames: list[Frame] | None = None) -> list[Frame]:
    """Step frames until ``done(game)``; every frame is observed. Fails with what the game showed."""
    seen = frames if frames is not None else []
    deadline = time.monotonic() + timeout_s
    while not done(game):
        if time.monotonic() > deadline:
            raise AssertionError(f"Not reached within {timeout_s} s: scene {game.scene.value}, engine "
                                 f"{game.link.state.value} ({game.link.message}), dialogue "
                                 f"{game.dialogue.state.value if game.dialogue else None}")
        alive = game.step()
        seen.append(observe(game))
        assert alive or done(game), "the game ended early"
    return seen


def run_script(game: Game, steps: list[Step], timeout_s: float = 60.0, frames: list[Frame] | None = None) -> list[Frame]:
    """Play ``steps``; the game keeps running afterwards (a finished script would otherwise end it)."""
    script = game.script = Script(steps)
    seen = run_until(game, lambda g: script.finished, timeout_s, frames)
    game.script, game.running = None, True
    return seen


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
