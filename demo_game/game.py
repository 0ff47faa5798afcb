"""The game: scenes, input, the frame loop. One ``step()`` is one frame and never blocks.

    TITLE ──Enter──► VILLAGE ──E/Enter near an NPC──► TALK ──Esc──► VILLAGE
      │ C              │ C / Esc → TITLE                 (Enter sends the typed line)
      ▼                ▼
    CREDITS ──Esc/C──► back to where it was opened

Each frame: the script (if any) posts its key events, pygame's events are handled, the engine link
is polled (zero-wait) and its reply events go to the open dialogue, the player moves, the scene is
drawn, and the frame's interval is recorded. The only wait is ``clock.tick`` capping the frame rate.
"""

from __future__ import annotations

import enum
import logging
import time
from pathlib import Path

import pygame
from npctalk.client import Busy, ClientError, DoneEvent, ErrorEvent, Reply, ServerUnavailable, TokenEvent
from npctalk.engine.persona import builtin_personas

from . import render, ui
from .config import DemoConfig
from .dialogue import Dialogue, Exchange
from .frames import FrameStats
from .link import EngineLink
from .notices import credits_lines
from .script import Script
from .world import Village

log = logging.getLogger(__name__)

MAX_DT_S = 0.1          # a longer frame does not teleport the player
TOAST_S = 4.0           # how long a passing notice stays on screen
CREDITS_SPEED = 25.0    # pixels per second of automatic scrolling
MOVE_KEYS = {pygame.K_LEFT: (-1, 0), pygame.K_a: (-1, 0), pygame.K_RIGHT: (1, 0), pygame.K_d: (1, 0),
             pygame.K_UP: (0, -1), pygame.K_w: (0, -1), pygame.K_DOWN: (0, 1), pygame.K_s: (0, 1)}
ENTER_KEYS = (pygame.K_RETURN, pygame.K_KP_ENTER)


class Scene(enum.Enum):
    TITLE = "title"
    VILLAGE = "village"
    TALK = "talk"
    CREDITS = "credits"


class Game:
    """Owns the window, the village, the engine link and the dialogues. ``close()`` when done."""

    def __init__(self, config: DemoConfig, script: Script | None = None) -> None:
        self.config, self.script = config, script
        pygame.display.init()
        pygame.font.init()
        self.screen = pygame.display.set_mode((config.width, config.height))
        pygame.display.set_caption("npctalk — Ashford")
        pygame.key.stop_text_input()  # only the dialogue box takes text (so E does not type an "e")
        self.fonts = ui.Fonts.load()
        self.village = Village.ashford()
        self.background = render.background(self.village, self.fonts.small)
        self.link = EngineLink(config)
        self.stats = FrameStats()
        self.clock = pygame.time.Clock()
        self.scene = Scene.TITLE
        self.dialogues: dict[str, Dialogue] = {}
        self.dialogue: Dialogue | None = None      # the open one (scene TALK)
        self.replies: dict[str, Reply] = {}        # replies on their way, by id
        self.transcript: list[Exchange] = []
        self.credit_lines = credits_lines(config.notices)
        self.credits_scroll, self._credits_from = 0.0, Scene.TITLE
        self.shown_thinking = False                # what the last frame drew (tests read these)
        self.shown_reply: list[str] = []
        self.shown_credits: list[str] = []
        self.held: set[int] = set()
        self.toast, self._toast_until = "", 0.0
        self.frame, self.running, self._closed, self._recalled = 0, True, False, False
        self._greetings = {key: p.greeting for key, p in builtin_personas().items()}
        self._start = time.perf_counter()
        self._last_frame: float | None = None

    # --- the loop -------------------------------------------------------------------------------------

    def run(self) -> None:
        """Frames until the player quits or the script ends."""
        while self.step():
            pass

    def step(self) -> bool:
        """One frame; False once the game should end."""
        start = time.perf_counter()
        interval = start - self._last_frame if self._last_frame is not None else 1.0 / self.config.fps
        self._last_frame = start
        if self.script is not None:
            self.script.advance(self)
        for event in pygame.event.get():
            self._handle(event)
        self._update(min(interval, MAX_DT_S))
        self._draw(start - self._start)
        pygame.display.flip()
        self.stats.record(interval, time.perf_counter() - start, streaming=bool(self.replies))
        self.frame += 1
        self.clock.tick(self.config.fps)
        if self.script is not None and self.script.finished:
            self.running = False
        return self.running

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pygame.image.save(self.screen, str(path))
        log.info("Saved a screenshot to %s", path)

    def close(self) -> None:
        """Stop the engine the demo started, log frame times, close the window. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.link.close()
        summary = self.stats.summary()
        if summary is not None:
            log.info("Frame times: %s", summary.line())
        pygame.display.quit()
        pygame.font.quit()

    # --- input ----------------------------------------------------------------------------------------

    def _handle(self, event: pygame.event.Event) -> None:
        if event.type == pygame.QUIT:
            self.running = False
        elif event.type == pygame.KEYDOWN:
            self._key(event.key)
        elif event.type == pygame.KEYUP:
            self.held.discard(event.key)
        elif event.type == pygame.TEXTINPUT and self.scene is Scene.TALK and self.dialogue is not None:
            self.dialogue.type(event.text)

    def _key(self, key: int) -> None:
        if self.scene is Scene.TITLE:
            if key in ENTER_KEYS or key == pygame.K_SPACE:
                self.scene = Scene.VILLAGE
            elif key == pygame.K_c:
                self._open_credits()
            elif key == pygame.K_ESCAPE:
                self.running = False
        elif self.scene is Scene.VILLAGE:
            if key in MOVE_KEYS:
                self.held.add(key)
            elif key in (pygame.K_e, *ENTER_KEYS) and (npc := self.village.nearest_npc()) is not None:
                self._open_talk(npc.key, npc.name)
            elif key == pygame.K_c:
                self._open_credits()
            elif key == pygame.K_ESCAPE:
                self.scene = Scene.TITLE
        elif self.scene is Scene.TALK:
            self._talk_key(key)
        elif key in (pygame.K_ESCAPE, pygame.K_c, *ENTER_KEYS):
            self.scene = self._credits_from
        elif key in (pygame.K_UP, pygame.K_DOWN):
            self.credits_scroll += 60 if key == pygame.K_DOWN else -60

    def _talk_key(self, key: int) -> None:
        d = self.dialogue
        assert d is not None
        if key == pygame.K_ESCAPE:
            if d.busy and d.reply_id in self.replies:
                self.link.cancel(self.replies[d.reply_id])
                d.fail("(You walked away before the reply ended.)")
            self.dialogue, self.scene = None, Scene.VILLAGE
            pygame.key.stop_text_input()
        elif key == pygame.K_BACKSPACE:
            d.backspace()
        elif key in ENTER_KEYS:
            self._send(d)

    def _open_talk(self, npc: str, name: str) -> None:
        self.held.clear()
        if npc not in self.dialogues:
            greeting = self._greetings.get(npc, "")
            if remembered := self.link.remembered.get(npc, 0):
                plural = "s" if remembered != 1 else ""
                greeting = f"({name} remembers you: {remembered} earlier exchange{plural}.) {greeting}"
            self.dialogues[npc] = Dialogue(npc, name, greeting)
        self.dialogue, self.scene = self.dialogues[npc], Scene.TALK
        pygame.key.start_text_input()

    def _open_credits(self) -> None:
        self._credits_from, self.scene, self.credits_scroll = self.scene, Scene.CREDITS, 0.0
        self.held.clear()

    def _send(self, d: Dialogue) -> None:
        if d.busy:
            return
        if not self.link.online:
            self._notify(f"{d.npc_name} cannot hear you yet: {self.link.message}")
            return
        line = d.take_line()
        if line is None:
            return
        npc = self.village.npc(d.npc_key)
        try:
            reply = self.link.say(d.npc_key, line, {"location": npc.place, "time_of_day": "afternoon"})
        except ClientError as exc:
            d.line = line
            d.fail(f"Could not send: {exc}")
            return
        d.send(line, reply.id)
        self.replies[reply.id] = reply
        log.info("%s to %s: %s", self.config.player, d.npc_name, line)

    # --- update ---------------------------------------------------------------------------------------

    def _update(self, dt: float) -> None:
        events = self.link.update()
        if self.link.online and not self._recalled:
            self.link.recall([n.key for n in self.village.npcs])  # a server with --memory-db knows the player
            self._recalled = True
        for event in events:
            d = self.dialogues.get(event.npc)
            mine = d is not None and d.reply_id == event.id
            if isinstance(event, TokenEvent):
                if mine:
                    assert d is not None
                    d.token(event.text)
                continue
            self.replies.pop(event.id, None)
            if not mine:
                continue
            assert d is not None
            if isinstance(event, DoneEvent):
                exchange = d.done(event.result.text, event.result.finish_reason)
                self.transcript.append(exchange)
                log.info("%s: %s  [%s, %d tokens]", exchange.npc, exchange.reply, exchange.finish_reason,
                         event.result.usage.completion_tokens)
            elif isinstance(event, ErrorEvent):
                log.warning("%s's reply failed: %s", d.npc_name, event.error)
                d.fail(_describe(event.error))
                self._notify(d.error)
        if self.scene is Scene.VILLAGE:
            dx = sum(MOVE_KEYS[k][0] for k in self.held if k in MOVE_KEYS)
            dy = sum(MOVE_KEYS[k][1] for k in self.held if k in MOVE_KEYS)
            self.village.move_player(max(-1, min(1, dx)), max(-1, min(1, dy)), dt)
        elif self.scene is Scene.CREDITS:
            end = len(self.credit_lines) * self.fonts.small.get_linesize() - (self.config.height - 80)
            self.credits_scroll = max(0.0, min(self.credits_scroll + CREDITS_SPEED * dt, float(end)))
        if self.toast and time.monotonic() > self._toast_until:
            self.toast = ""

    def _notify(self, text: str) -> None:
        self.toast, self._toast_until = text, time.monotonic() + TOAST_S

    # --- drawing --------------------------------------------------------------------------------------

    def _draw(self, t: float) -> None:
        self.shown_thinking, self.shown_reply = False, []
        if self.scene is Scene.TITLE:
            ui.title(self.screen, self.fonts, t)
        elif self.scene is Scene.CREDITS:
            self.shown_credits = ui.credits(self.screen, self.fonts, self.credit_lines, self.credits_scroll)
        else:
            near = self.village.nearest_npc() if self.scene is Scene.VILLAGE else None
            render.village_frame(self.screen, self.village, self.background, t, self.fonts.small, near)
            if self.scene is Scene.TALK and self.dialogue is not None:
                self.shown_thinking, self.shown_reply = ui.dialogue_box(self.screen, self.fonts, self.dialogue, t)
        quiet = self.scene is Scene.CREDITS  # the notices need the whole screen
        ui.hud(self.screen, self.fonts, self.stats.fps, self.link.state, "" if quiet else self.link.message,
               "" if quiet else self.toast)


def _describe(error: ClientError) -> str:
    """What the player reads when a reply fails."""
    if isinstance(error, ServerUnavailable):
        return "The engine went away mid-reply. Reconnecting… (press Enter to say it again once it is back)"
    if isinstance(error, Busy):
        return "Too many villagers are talking at once; try again in a moment."
    return f"The reply failed: {error}"
