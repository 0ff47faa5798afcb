"""Screens and overlays: title, credits, the dialogue box, and the HUD (fps, engine status, notices).

Every function draws onto the given surface and returns nothing but what tests may inspect (the
lines it showed). Text uses pygame's bundled default font; no downloaded assets.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pygame

from .dialogue import Dialogue, ReplyState
from .link import LinkState

INK = (30, 26, 22)
PAPER = (250, 244, 228)
GOLD = (230, 190, 90)
STATUS_COLORS = {LinkState.ONLINE: (90, 200, 110), LinkState.PROBING: (230, 190, 90), LinkState.STARTING: (230, 190, 90),
                 LinkState.LOST: (235, 120, 60), LinkState.FAILED: (230, 70, 70)}


@dataclass(frozen=True)
class Fonts:
    small: pygame.font.Font
    body: pygame.font.Font
    title: pygame.font.Font

    @classmethod
    def load(cls) -> Fonts:
        return cls(pygame.font.Font(None, 22), pygame.font.Font(None, 28), pygame.font.Font(None, 72))


def printable(text: str) -> str:
    """``text`` without control characters (SDL_ttf refuses NUL; a model may emit any byte)."""
    return "".join(ch if ch.isprintable() else " " for ch in text)


def wrap(text: str, font: pygame.font.Font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; words longer than a line are cut by characters.
    Control characters are blanked, so every returned line can be rendered."""
    return list(_wrap(text, font, width))


@functools.lru_cache(maxsize=64)
def _wrap(text: str, font: pygame.font.Font, width: int) -> tuple[str, ...]:
    """Cached: a reply is wrapped once per new token, not once per frame."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        paragraph = printable(paragraph)
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.size(candidate)[0] <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while font.size(word)[0] > width:
                cut = max(1, next((i for i in range(len(word), 0, -1) if font.size(word[:i])[0] <= width), 1))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return tuple(lines)


@functools.lru_cache(maxsize=512)
def text(font: pygame.font.Font, line: str, color: tuple[int, int, int]) -> pygame.Surface:
    """A rendered line, cached: the same lines are drawn every frame."""
    return font.render(line, True, color)


def title(surface: pygame.Surface, fonts: Fonts, t: float) -> None:
    w, h = surface.get_size()
    for y in range(0, h, 4):  # dusk sky
        k = y / h
        pygame.draw.rect(surface, (int(40 + 150 * k), int(40 + 70 * k), int(90 + 20 * k)), (0, y, w, 4))
    pygame.draw.circle(surface, (250, 210, 120), (int(w * 0.75), int(h * 0.42)), 60)
    for i, (x, height) in enumerate(((0.1, 80), (0.25, 120), (0.4, 90), (0.62, 110), (0.85, 70))):
        roof = [(int(w * x) - 70, h - 160), (int(w * x), h - 160 - height), (int(w * x) + 70, h - 160)]
        pygame.draw.rect(surface, (50, 40, 45), (int(w * x) - 55, h - 160, 110, 160))
        pygame.draw.polygon(surface, (35, 28, 32), roof)
        if (int(t * 2) + i) % 3:
            pygame.draw.rect(surface, (250, 200, 110), (int(w * x) - 12, h - 110, 22, 18))
    name = fonts.title.render("Ashford", True, PAPER)
    surface.blit(name, name.get_rect(center=(w // 2, h // 4)))
    sub = fonts.body.render("three villagers, one small language model", True, PAPER)
    surface.blit(sub, sub.get_rect(center=(w // 2, h // 4 + 50)))
    blink = 0.5 + 0.5 * math.sin(t * 4)
    hint = fonts.body.render("Enter: start    C: credits    Esc: quit", True, (255, int(200 + 55 * blink), 150))
    surface.blit(hint, hint.get_rect(center=(w // 2, h // 2 + 20)))


def credits(surface: pygame.Surface, fonts: Fonts, lines: list[str], scroll: float) -> list[str]:
    """The notices, scrolled by ``scroll`` pixels; returns the lines drawn on screen."""
    w, h = surface.get_size()
    surface.fill((24, 22, 30))
    heading = fonts.body.render("Credits — Esc or C to go back, arrows to scroll", True, GOLD)
    surface.blit(heading, (24, 40))  # below the HUD's status line
    top, step, shown = 76, fonts.small.get_linesize(), []
    clip = surface.get_clip()
    surface.set_clip(pygame.Rect(0, top, w, h - top))
    for i, line in enumerate(lines):
        y = top + i * step - int(scroll)
        if top - step < y < h:
            surface.blit(text(fonts.small, line, PAPER), (24, y))
            shown.append(line)
    surface.set_clip(clip)
    return shown


@functools.lru_cache(maxsize=4)
def _shade(size: tuple[int, int]) -> pygame.Surface:
    """The dialogue box's translucent paper, made once per size."""
    shade = pygame.Surface(size, pygame.SRCALPHA)
    shade.fill((*PAPER, 240))
    return shade


def dialogue_box(surface: pygame.Surface, fonts: Fonts, d: Dialogue, t: float) -> tuple[bool, list[str]]:
    """The box at the bottom: the player's line, the NPC's reply (or "thinking…"), the input line.
    Returns whether the thinking indicator was drawn, and the reply lines drawn."""
    w, h = surface.get_size()
    box = pygame.Rect(20, h - 230, w - 40, 210)
    surface.blit(_shade(box.size), box.topleft)
    pygame.draw.rect(surface, INK, box, 3, border_radius=6)
    surface.blit(fonts.body.render(d.npc_name, True, (120, 50, 30)), (box.left + 16, box.top + 10))
    y = box.top + 40
    if d.line:
        for line in wrap(f"You: {d.line}", fonts.small, box.width - 32)[-2:]:
            surface.blit(text(fonts.small, line, (70, 70, 90)), (box.left + 16, y))
            y += fonts.small.get_linesize()
    shown: list[str] = []
    if d.state is ReplyState.THINKING:
        dots = "." * (1 + int(t * 3) % 3)
        surface.blit(fonts.body.render(f"{d.npc_name} is thinking{dots}", True, (130, 110, 90)), (box.left + 16, y + 4))
    else:
        lines = wrap(d.reply, fonts.body, box.width - 32)
        room = max(1, (box.bottom - 44 - y) // fonts.body.get_linesize())
        shown = lines[-room:]  # the newest lines stay visible while it streams
        for line in shown:
            surface.blit(text(fonts.body, line, INK), (box.left + 16, y + 2))
            y += fonts.body.get_linesize()
        if d.state is ReplyState.STREAMING and int(t * 4) % 2:
            pygame.draw.rect(surface, INK, (box.left + 18 + fonts.body.size(shown[-1] if shown else "")[0], y - 20, 8, 16))
    if d.error:
        surface.blit(fonts.small.render(wrap(d.error, fonts.small, box.width - 32)[0], True, (180, 40, 30)),
                     (box.left + 16, box.bottom - 58))
    entry = pygame.Rect(box.left + 12, box.bottom - 36, box.width - 24, 26)
    prompt = d.input + ("|" if int(t * 2) % 2 else "")  # typing ahead while the NPC answers is allowed
    while len(prompt) > 1 and fonts.small.size(prompt)[0] > entry.width - 200:
        prompt = prompt[1:]  # show the end of a long line
    pygame.draw.rect(surface, (255, 255, 255), entry, border_radius=4)
    pygame.draw.rect(surface, (150, 140, 120), entry, 1, border_radius=4)
    hint = "Enter: send   Esc: close" if not d.busy else f"{d.npc_name} is answering…   Esc: close"
    surface.blit(fonts.small.render(f"> {prompt}", True, INK), (entry.left + 6, entry.top + 5))
    hint_img = fonts.small.render(hint, True, (120, 110, 100))
    surface.blit(hint_img, hint_img.get_rect(topright=(entry.right - 6, entry.top + 5)))
    return d.state is ReplyState.THINKING, shown


def hud(surface: pygame.Surface, fonts: Fonts, fps: float, state: LinkState, message: str, toast: str) -> None:
    """fps (top right), the engine's state (top left), and a passing notice (top centre)."""
    w, _ = surface.get_size()
    fps_img = fonts.small.render(f"{fps:5.1f} fps", True, (255, 255, 255))
    back = fps_img.get_rect(topright=(w - 10, 8)).inflate(10, 6)
    pygame.draw.rect(surface, (0, 0, 0), back, border_radius=4)
    surface.blit(fps_img, fps_img.get_rect(center=back.center))
    label = "engine: " + state.value
    status = fonts.small.render(label, True, STATUS_COLORS[state])
    back = status.get_rect(topleft=(10, 8)).inflate(10, 6)
    pygame.draw.rect(surface, (0, 0, 0), back, border_radius=4)
    surface.blit(status, status.get_rect(center=back.center))
    text = toast or (message if state is not LinkState.ONLINE else "")
    if text:
        lines = wrap(text, fonts.small, w - 360)[:3]
        height = len(lines) * fonts.small.get_linesize() + 10
        panel = pygame.Rect(0, 6, max(fonts.small.size(line)[0] for line in lines) + 20, height)
        panel.centerx = w // 2
        pygame.draw.rect(surface, (40, 30, 20), panel, border_radius=6)
        pygame.draw.rect(surface, STATUS_COLORS[state], panel, 2, border_radius=6)
        for i, line in enumerate(lines):
            surface.blit(fonts.small.render(line, True, PAPER), (panel.left + 10, panel.top + 5 + i * fonts.small.get_linesize()))
