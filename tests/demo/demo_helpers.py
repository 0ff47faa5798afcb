"""What the demo tests share: stepping a game frame by frame, and the checks several tests make.

(``conftest.py`` selects SDL's dummy drivers before this module or pygame is imported.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pygame
import pytest
import zmq
from npctalk.demo.game import Game
from npctalk.demo.link import probe
from npctalk.demo.script import Press, Script, Step, Type, WaitFor, WalkTo


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


STREAMING_FRAME_BOUND_S = 0.3  # 18x a 60 fps frame: generous for a loaded 2-core CI machine

# Replies long enough to be seen streaming over many frames, and cut mid-way by a kill or Esc, even on
# a fast VM: the tiny GPT-2 streamed 200 tokens within 2 frames on one about twice as fast as earlier
# ones. 560 fit the tiny model's 1024-token context after Elda's 434-token prompt, the longest.
LONG_REPLY_TOKENS = 560
LONG_REPLY = ("--max-new-tokens", str(LONG_REPLY_TOKENS))  # `npctalk serve` allows 256 unless told


def talk_steps(npc: str, line: str) -> list:
    return [WaitFor("online", 30), Press(pygame.K_RETURN), WalkTo(npc), Press(pygame.K_e), Type(line),
            Press(pygame.K_RETURN)]


def pixel_spread(path: Path) -> tuple[float, int]:
    """Standard deviation of the pixel values and the number of distinct colours of a PNG."""
    pixels = pygame.surfarray.array3d(pygame.image.load(str(path))).reshape(-1, 3)
    return float(pixels.std()), len(np.unique(pixels, axis=0))


def streaming(game: Game) -> bool:
    return game.dialogue is not None and game.dialogue.state.value == "streaming"


def reply_over(game: Game) -> bool:
    return game.dialogue is not None and game.dialogue.reply_id is None


def nobody_at(endpoint: str) -> bool:
    context = zmq.Context()
    try:
        return probe(endpoint, 0.5, context) is None
    finally:
        context.term()


def kill_at_first_token(monkeypatch: pytest.MonkeyPatch, kill: Callable[[], None]) -> Callable[[], bool]:
    """Call ``kill`` (stop the engine) the moment the game takes a reply's first token, inside the frame
    that reads it; returns "has it fired". Waiting for a later frame leaves the tiny model time to end
    its reply first (a fast VM streams a few hundred tokens a frame, and a stop string may come early)."""
    from npctalk.demo.dialogue import Dialogue

    original, fired = Dialogue.token, []

    def token(self: Dialogue, text: str) -> None:
        original(self, text)
        if not fired:
            fired.append(True)
            kill()

    monkeypatch.setattr(Dialogue, "token", token)
    return lambda: bool(fired)


def skip_unless_cut(game: Game) -> None:
    """The case under test needs the reply cut by the engine's loss; a reply that ended before the kill
    landed (its end was already read in the same frame) tests nothing: skip, saying so."""
    d = game.dialogue
    if d is not None and d.state.value == "idle" and d.reply:
        pytest.skip("the reply ended in the same frame as its first token, before the kill landed")
