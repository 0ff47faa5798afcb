"""Ashford village as data: where the buildings, trees and NPCs are, and how the player moves.

No drawing here (``render.py`` draws this) and no pygame display: positions are pixels in a
960x640 world, ``pygame.Rect`` only for collision. Moving is axis by axis, so the player slides
along walls instead of sticking to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pygame

TILE = 32                  # pixels
WORLD_W, WORLD_H = 960, 640
PLAYER_SPEED = 170.0       # pixels per second
PLAYER_SIZE = 20           # collision box, pixels
TALK_RADIUS = 64.0         # pixels between centres within which E talks

Color = tuple[int, int, int]


@dataclass(frozen=True)
class Npc:
    """One villager. ``key`` is the server's NPC id (a built-in persona)."""

    key: str
    name: str
    place: str                 # sent as context["location"]
    x: float
    y: float
    tunic: Color
    hair: Color

    @property
    def rect(self) -> pygame.Rect:
        return pygame.Rect(int(self.x) - 11, int(self.y) - 11, 22, 22)


@dataclass(frozen=True)
class Building:
    name: str
    rect: pygame.Rect          # walls; the roof overhangs by a few pixels
    wall: Color
    roof: Color
    door_x: int                # door centre on the bottom wall


@dataclass(frozen=True)
class Tree:
    x: int
    y: int
    radius: int
    fruit: bool = False        # Hilde's apple tree beside the smithy


@dataclass
class Player:
    x: float
    y: float
    facing: tuple[int, int] = (0, 1)
    walked: float = 0.0        # distance walked, pixels (drives the step animation)

    @property
    def rect(self) -> pygame.Rect:
        half = PLAYER_SIZE // 2
        return pygame.Rect(int(self.x) - half, int(self.y) - half, PLAYER_SIZE, PLAYER_SIZE)


def _build_village() -> Village:
    buildings = [
        Building("Forge", pygame.Rect(2 * TILE, 2 * TILE, 7 * TILE, 4 * TILE), (120, 110, 100), (70, 60, 60), 5 * TILE),
        Building("Crooked Kettle", pygame.Rect(20 * TILE, 2 * TILE, 8 * TILE, 5 * TILE), (190, 160, 120), (150, 60, 50),
                 24 * TILE),
        Building("Gatehouse", pygame.Rect(12 * TILE, 0, 6 * TILE, 2 * TILE), (110, 100, 90), (90, 80, 70), 15 * TILE),
    ]
    trees = [Tree(10 * TILE, 4 * TILE, 22, fruit=True), Tree(2 * TILE, 12 * TILE, 26), Tree(4 * TILE, 17 * TILE, 24),
             Tree(27 * TILE, 12 * TILE, 28), Tree(25 * TILE, 17 * TILE, 22), Tree(19 * TILE, 17 * TILE, 18)]
    palisade = [pygame.Rect(0, 0, 12 * TILE, 12), pygame.Rect(18 * TILE, 0, 12 * TILE, 12)]
    well = pygame.Rect(8 * TILE + 4, 12 * TILE + 4, TILE - 8, TILE - 8)
    pond = pygame.Rect(5 * TILE, 14 * TILE + 8, 4 * TILE, 2 * TILE)
    blocks = [b.rect for b in buildings] + [pygame.Rect(t.x - 10, t.y - 6, 20, 16) for t in trees] + palisade + [well, pond]
    npcs = [
        Npc("bram", "Bram", "the forge", 6 * TILE, 7 * TILE, (110, 70, 40), (90, 90, 90)),
        Npc("elda", "Elda", "the Crooked Kettle inn", 23 * TILE, 8 * TILE + 8, (60, 110, 70), (170, 90, 40)),
        Npc("tobin", "Tobin", "the north gate", 17 * TILE + 12, 3 * TILE, (70, 80, 140), (60, 40, 20)),
    ]
    return Village(buildings, trees, blocks, npcs, well, pond)


@dataclass
class Village:
    """The map, its NPCs and the player. ``blocks``: everything the player cannot walk through."""

    buildings: list[Building]
    trees: list[Tree]
    blocks: list[pygame.Rect]
    npcs: list[Npc]
    well: pygame.Rect
    pond: pygame.Rect
    player: Player = field(default_factory=lambda: Player(15 * TILE, 16 * TILE))

    @classmethod
    def ashford(cls) -> Village:
        return _build_village()

    def npc(self, key: str) -> Npc:
        for npc in self.npcs:
            if npc.key == key:
                return npc
        raise KeyError(f"No NPC {key!r} in the village; there are {[n.key for n in self.npcs]}.")

    def move_player(self, dx: int, dy: int, dt: float) -> None:
        """Walk in direction (dx, dy) ∈ {-1, 0, 1}² for ``dt`` seconds, stopping at walls and NPCs."""
        if dx == 0 and dy == 0:
            return
        p = self.player
        p.facing = (dx, dy)
        step = PLAYER_SPEED * dt / math.hypot(dx, dy)
        solid = self.blocks + [n.rect for n in self.npcs]
        for axis_dx, axis_dy in ((dx, 0), (0, dy)):
            if axis_dx == 0 and axis_dy == 0:
                continue
            old = (p.x, p.y)
            p.x = min(max(p.x + axis_dx * step, PLAYER_SIZE / 2), WORLD_W - PLAYER_SIZE / 2)
            p.y = min(max(p.y + axis_dy * step, PLAYER_SIZE / 2), WORLD_H - PLAYER_SIZE / 2)
            if p.rect.collidelist(solid) != -1:
                p.x, p.y = old
            else:
                p.walked += step

    def nearest_npc(self) -> Npc | None:
        """The NPC within talking distance of the player, closest first; None when nobody is near."""
        p = self.player
        near = [(math.hypot(n.x - p.x, n.y - p.y), n) for n in self.npcs]
        near = [(d, n) for d, n in near if d <= TALK_RADIUS]
        return min(near, key=lambda pair: pair[0])[1] if near else None
