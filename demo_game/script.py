"""Scripted play: a list of steps that post key events into pygame's queue, one frame at a time.

The game cannot tell scripted keys from real ones: ``Press`` posts KEYDOWN/KEYUP, ``Type`` posts
TEXTINPUT, ``WalkTo`` holds arrow keys until the NPC is within talking distance. ``WaitFor`` and
``Frames`` only wait. This drives the headless demo (no display) and the tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pygame

if TYPE_CHECKING:
    from .game import Game

log = logging.getLogger(__name__)

ALIGN_PX = 6          # close enough on one axis to walk along the other
STUCK_FRAMES = 12     # frames without moving before WalkTo tries the other axis first


class ScriptError(Exception):
    """A scripted step did not happen in time; the message names the step and what the game showed."""


@dataclass(frozen=True)
class Press:
    key: int


@dataclass(frozen=True)
class Type:
    text: str


@dataclass(frozen=True)
class WalkTo:
    npc: str
    timeout_s: float = 20.0


@dataclass(frozen=True)
class WaitFor:
    """``what``: "online" (engine connected), "reply" (the open dialogue's reply ended), "scene:NAME"."""

    what: str
    timeout_s: float = 60.0


@dataclass(frozen=True)
class Frames:
    count: int


@dataclass(frozen=True)
class Screenshot:
    path: Path


Step = Press | Type | WalkTo | WaitFor | Frames | Screenshot


def conversation(lines: Sequence[tuple[str, str]], screenshot: Path | None, start_timeout_s: float = 180.0) -> list[Step]:
    """Title → village → for each (npc, line): walk there, E, type, Enter, wait for the reply, Esc.
    A screenshot is taken when the first reply has finished, with the dialogue box open."""
    steps: list[Step] = [WaitFor("online", start_timeout_s), Press(pygame.K_RETURN)]
    for i, (npc, line) in enumerate(lines):
        steps += [WalkTo(npc), Press(pygame.K_e), Type(line), Press(pygame.K_RETURN), WaitFor("reply", 120.0)]
        if i == 0 and screenshot is not None:
            steps.append(Screenshot(screenshot))
        steps.append(Press(pygame.K_ESCAPE))
    return steps + [Press(pygame.K_c), Frames(10), Press(pygame.K_ESCAPE), Frames(2)]


DEFAULT_LINES = (("bram", "Hello! What do you sell at the forge?"), ("elda", "Any rumours at the inn today?"))


class Script:
    """Runs steps in order; ``advance(game)`` once per frame before the game reads its events."""

    def __init__(self, steps: Sequence[Step], clock: Callable[[], float] = time.monotonic) -> None:
        self.steps, self.clock = list(steps), clock
        self.index = 0
        self._started: float | None = None
        self._frames = 0
        self._pressed: int | None = None
        self._held: set[int] = set()
        self._last_pos: tuple[float, float] | None = None
        self._still = 0
        self._vertical_first = True

    @property
    def finished(self) -> bool:
        return self.index >= len(self.steps)

    def advance(self, game: Game) -> None:
        if self.finished:
            return
        step = self.steps[self.index]
        if self._started is None:
            self._started, self._frames = self.clock(), 0
            log.debug("Script step %d: %s", self.index, step)
        self._frames += 1
        if self._run(step, game):
            self.index, self._started = self.index + 1, None

    def _run(self, step: Step, game: Game) -> bool:
        """One frame of ``step``; True when it is complete."""
        if isinstance(step, Press):
            if self._pressed is None:
                _post(pygame.KEYDOWN, key=step.key, mod=0, unicode="", scancode=0)
                self._pressed = step.key
                return False
            _post(pygame.KEYUP, key=step.key, mod=0, unicode="", scancode=0)
            self._pressed = None
            return True
        if isinstance(step, Type):
            for ch in step.text:
                _post(pygame.TEXTINPUT, text=ch)
            return True
        if isinstance(step, Frames):
            return self._frames >= step.count
        if isinstance(step, Screenshot):
            game.screenshot(step.path)
            return True
        self._check_timeout(step, game)
        if isinstance(step, WaitFor):
            return self._condition(step.what, game)
        return self._walk(step, game)

    def _check_timeout(self, step: WalkTo | WaitFor, game: Game) -> None:
        assert self._started is not None
        if self.clock() - self._started > step.timeout_s:
            self._release()
            raise ScriptError(f"Step {self.index} ({step}) did not complete within {step.timeout_s:g} s; "
                              f"scene {game.scene.value}, engine {game.link.state.value}: {game.link.message}")

    @staticmethod
    def _condition(what: str, game: Game) -> bool:
        if what == "online":
            if game.link.state.value == "failed":
                raise ScriptError(f"The engine failed: {game.link.message}")
            return game.link.online
        if what == "reply":
            d = game.dialogue
            return d is not None and not d.busy and d.reply_id is None and bool(d.line)
        if what.startswith("scene:"):
            return game.scene.value == what.removeprefix("scene:")
        raise ScriptError(f"Unknown WaitFor condition {what!r}; use online, reply or scene:NAME.")

    def _walk(self, step: WalkTo, game: Game) -> bool:
        near = game.village.nearest_npc()
        if near is not None and near.key == step.npc:
            self._release()
            return True
        target, p = game.village.npc(step.npc), game.village.player
        pos = (p.x, p.y)
        self._still = self._still + 1 if pos == self._last_pos else 0
        self._last_pos = pos
        if self._still >= STUCK_FRAMES:
            self._vertical_first, self._still = not self._vertical_first, 0
        dx, dy = target.x - p.x, target.y - p.y
        vertical = abs(dy) > ALIGN_PX and (self._vertical_first or abs(dx) <= ALIGN_PX)
        if vertical:
            want = {pygame.K_DOWN if dy > 0 else pygame.K_UP}
        else:
            want = {pygame.K_RIGHT if dx > 0 else pygame.K_LEFT} if abs(dx) > ALIGN_PX else set()
        for key in self._held - want:
            _post(pygame.KEYUP, key=key, mod=0, unicode="", scancode=0)
        for key in want - self._held:
            _post(pygame.KEYDOWN, key=key, mod=0, unicode="", scancode=0)
        self._held = want
        return False

    def _release(self) -> None:
        for key in self._held:
            _post(pygame.KEYUP, key=key, mod=0, unicode="", scancode=0)
        self._held = set()


def _post(kind: int, **attrs: object) -> None:
    pygame.event.post(pygame.event.Event(kind, attrs))
