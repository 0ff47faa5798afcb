"""Drawing Ashford with pygame primitives: ground, roads, buildings, trees, water, villagers.

The static part (grass, roads, buildings, trees) is drawn once into a background surface; each
frame blits it and draws only what moves (the forge's glow, the pond's shimmer, people).
"""

from __future__ import annotations

import math
import random

import pygame

from .world import TILE, WORLD_H, WORLD_W, Building, Npc, Player, Tree, Village

GRASS = (92, 150, 70)
GRASS_DARK = (78, 132, 60)
DIRT = (176, 146, 100)
DIRT_EDGE = (150, 122, 84)
STAKE = (120, 85, 50)
SKIN = (236, 196, 160)
INK = (30, 26, 22)


def _ground(surface: pygame.Surface) -> None:
    surface.fill(GRASS)
    rng = random.Random(7)  # same tufts every run
    for _ in range(700):
        x, y = rng.randrange(WORLD_W), rng.randrange(WORLD_H)
        pygame.draw.line(surface, GRASS_DARK, (x, y), (x + rng.choice((-2, 2)), y - 4), 1)
    roads = [pygame.Rect(13 * TILE + 16, 2 * TILE, 3 * TILE, WORLD_H), pygame.Rect(0, 9 * TILE, WORLD_W, 2 * TILE + 8),
             pygame.Rect(4 * TILE + 16, 6 * TILE, TILE + 8, 3 * TILE), pygame.Rect(23 * TILE + 16, 7 * TILE, TILE + 8, 2 * TILE)]
    for road in roads:
        pygame.draw.rect(surface, DIRT_EDGE, road.inflate(6, 6), border_radius=10)
    for road in roads:
        pygame.draw.rect(surface, DIRT, road, border_radius=8)
    for _ in range(160):  # pebbles on the roads
        road = rng.choice(roads)
        x, y = rng.randrange(road.left, road.right), rng.randrange(road.top, road.bottom)
        pygame.draw.circle(surface, DIRT_EDGE, (x, y), rng.choice((1, 2)))


def _palisade(surface: pygame.Surface) -> None:
    for x in list(range(0, 12 * TILE, 12)) + list(range(18 * TILE, WORLD_W, 12)):
        pygame.draw.rect(surface, STAKE, (x + 1, 4, 10, 14))
        pygame.draw.polygon(surface, STAKE, [(x + 1, 4), (x + 6, -2), (x + 11, 4)])
        pygame.draw.line(surface, INK, (x + 11, 4), (x + 11, 17), 1)


def _building(surface: pygame.Surface, b: Building, font: pygame.font.Font) -> None:
    r = b.rect
    shadow = pygame.Rect(r.left + 6, r.bottom - 4, r.width, 10)
    pygame.draw.ellipse(surface, GRASS_DARK, shadow)
    wall = pygame.Rect(r.left, r.top + r.height // 2, r.width, r.height // 2)
    pygame.draw.rect(surface, b.wall, wall)
    for y in range(wall.top + 8, wall.bottom, 10):  # plank or stone courses
        pygame.draw.line(surface, tuple(max(0, c - 25) for c in b.wall), (wall.left, y), (wall.right, y), 1)
    roof = [(r.left - 6, wall.top + 2), (r.left + 10, r.top), (r.right - 10, r.top), (r.right + 6, wall.top + 2)]
    pygame.draw.polygon(surface, b.roof, roof)
    pygame.draw.line(surface, tuple(min(255, c + 40) for c in b.roof), (r.left + 10, r.top + 3), (r.right - 10, r.top + 3), 3)
    for x in range(r.left + 4, r.right - 4, 14):  # roof tiles
        pygame.draw.line(surface, tuple(max(0, c - 30) for c in b.roof), (x, r.top + 6), (x - 4, wall.top), 1)
    pygame.draw.polygon(surface, INK, roof, 2)
    door = pygame.Rect(b.door_x - 12, wall.bottom - 30, 24, 30)
    pygame.draw.rect(surface, (90, 60, 35), door, border_top_left_radius=10, border_top_right_radius=10)
    pygame.draw.circle(surface, (220, 190, 80), (door.right - 6, door.centery + 2), 2)
    for wx in (r.left + 20, r.right - 44):
        if abs(wx + 12 - b.door_x) > 30:
            window = pygame.Rect(wx, wall.top + 10, 24, 18)
            pygame.draw.rect(surface, (250, 220, 130), window)
            pygame.draw.rect(surface, INK, window, 2)
            pygame.draw.line(surface, INK, window.midtop, window.midbottom, 2)
    label = font.render(b.name, True, (250, 240, 220))
    sign = label.get_rect(midbottom=(r.centerx, wall.top - 4)).inflate(10, 4)
    pygame.draw.rect(surface, (95, 65, 40), sign, border_radius=3)
    surface.blit(label, label.get_rect(center=sign.center))


def _tree(surface: pygame.Surface, t: Tree) -> None:
    pygame.draw.ellipse(surface, GRASS_DARK, (t.x - t.radius, t.y + 4, 2 * t.radius, t.radius // 2 + 6))
    pygame.draw.rect(surface, (100, 70, 40), (t.x - 4, t.y - 4, 8, 14))
    for dx, dy, k in ((-0.45, -0.2, 0.7), (0.45, -0.2, 0.7), (0.0, -0.7, 0.8), (0.0, -0.35, 0.9)):
        pygame.draw.circle(surface, (50, 110, 50), (int(t.x + dx * t.radius), int(t.y - 8 + dy * t.radius)), int(k * t.radius))
    pygame.draw.circle(surface, (80, 145, 70), (t.x - t.radius // 4, t.y - 8 - t.radius // 2), t.radius // 3)
    if t.fruit:
        rng = random.Random(t.x * 31 + t.y)
        for _ in range(9):
            angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0.2, 0.8) * t.radius
            pygame.draw.circle(surface, (200, 40, 40), (int(t.x + dist * math.cos(angle)),
                                                          int(t.y - 14 + 0.7 * dist * math.sin(angle))), 3)


def _well(surface: pygame.Surface, rect: pygame.Rect) -> None:
    pygame.draw.circle(surface, (130, 130, 135), rect.center, rect.width // 2 + 2)
    pygame.draw.circle(surface, (40, 60, 90), rect.center, rect.width // 2 - 4)
    for x in (rect.left - 2, rect.right - 2):
        pygame.draw.rect(surface, STAKE, (x, rect.top - 18, 4, rect.height // 2 + 18))
    pygame.draw.polygon(surface, (150, 60, 50), [(rect.left - 8, rect.top - 16), (rect.centerx, rect.top - 30),
                                                  (rect.right + 8, rect.top - 16)])


def background(village: Village, font: pygame.font.Font) -> pygame.Surface:
    """Everything that never moves, drawn once."""
    surface = pygame.Surface((WORLD_W, WORLD_H))
    _ground(surface)
    _palisade(surface)
    pygame.draw.ellipse(surface, (60, 110, 170), village.pond)
    pygame.draw.ellipse(surface, (40, 90, 140), village.pond, 3)
    for b in village.buildings:
        _building(surface, b, font)
    anvil = pygame.Rect(8 * TILE - 4, 6 * TILE + 10, 26, 10)
    pygame.draw.rect(surface, (55, 55, 60), anvil, border_radius=3)
    pygame.draw.rect(surface, (55, 55, 60), (anvil.centerx - 5, anvil.bottom, 10, 8))
    for x in (26 * TILE + 4, 27 * TILE + 6):  # barrels by the inn
        pygame.draw.ellipse(surface, (130, 90, 50), (x, 6 * TILE + 14, 22, 28))
        pygame.draw.line(surface, INK, (x + 1, 6 * TILE + 28), (x + 21, 6 * TILE + 28), 2)
    _well(surface, village.well)
    for t in sorted(village.trees, key=lambda t: t.y):
        _tree(surface, t)
    return surface


def animated(surface: pygame.Surface, village: Village, t: float) -> None:
    """What moves without the player: the forge's fire and smoke, the pond's shimmer."""
    forge = village.buildings[0].rect
    glow = 150 + int(80 * (0.5 + 0.5 * math.sin(t * 9.0) * math.sin(t * 3.1)))
    pygame.draw.rect(surface, (glow, glow // 3, 20), (forge.left + 20, forge.bottom - 24, 22, 14), border_radius=4)
    chimney = pygame.Rect(forge.right - 40, forge.top - 16, 16, 24)
    pygame.draw.rect(surface, (90, 80, 75), chimney)
    for i in range(3):
        phase = (t * 0.6 + i / 3) % 1.0
        pygame.draw.circle(surface, (200, 200, 200), (chimney.centerx + int(8 * math.sin(phase * 6 + i)),
                                                      chimney.top - int(40 * phase)), int(4 + 6 * phase))
    pond = village.pond
    for i in range(3):
        x = pond.left + 20 + ((int(t * 20) + i * 37) % (pond.width - 40))
        y = pond.top + 14 + i * 16
        pygame.draw.line(surface, (170, 210, 240), (x, y), (x + 12, y), 2)


def person(surface: pygame.Surface, x: float, y: float, tunic: tuple[int, int, int], hair: tuple[int, int, int],
           facing: tuple[int, int], bob: float) -> None:
    """A villager seen from above and slightly south: shadow, body, head, hair, eyes."""
    cx, cy = int(x), int(y - bob)
    pygame.draw.ellipse(surface, (40, 70, 35), (int(x) - 11, int(y) + 8, 22, 8))
    pygame.draw.rect(surface, tunic, (cx - 9, cy - 4, 18, 16), border_radius=6)
    pygame.draw.rect(surface, INK, (cx - 9, cy - 4, 18, 16), 1, border_radius=6)
    pygame.draw.circle(surface, SKIN, (cx, cy - 10), 8)
    pygame.draw.arc(surface, hair, (cx - 9, cy - 19, 18, 16), 0.1, math.pi - 0.1, 5)
    if facing[1] >= 0:  # eyes when not walking away
        ex = 3 * facing[0]
        for dx in (-3, 3):
            pygame.draw.circle(surface, INK, (cx + dx + ex, cy - 9), 1)


def npc(surface: pygame.Surface, n: Npc, t: float, font: pygame.font.Font) -> None:
    person(surface, n.x, n.y, n.tunic, n.hair, (0, 1), 1.5 * math.sin(t * 2.0 + n.x))
    label = font.render(n.name, True, (255, 255, 255))
    box = label.get_rect(midbottom=(int(n.x), int(n.y) - 22)).inflate(8, 2)
    pygame.draw.rect(surface, (0, 0, 0), box, border_radius=4)
    surface.blit(label, label.get_rect(center=box.center))


def player(surface: pygame.Surface, p: Player) -> None:
    bob = 2.0 * abs(math.sin(p.walked / 10.0))
    person(surface, p.x, p.y, (200, 170, 60), (240, 220, 120), p.facing, bob)


def talk_hint(surface: pygame.Surface, n: Npc, font: pygame.font.Font) -> None:
    """The "E: talk" bubble over the NPC the player stands next to."""
    text = font.render(f"E: talk to {n.name}", True, INK)
    bubble = text.get_rect(midbottom=(int(n.x), int(n.y) - 44)).inflate(14, 8)
    pygame.draw.rect(surface, (255, 250, 235), bubble, border_radius=8)
    pygame.draw.rect(surface, INK, bubble, 2, border_radius=8)
    pygame.draw.polygon(surface, (255, 250, 235), [(bubble.centerx - 6, bubble.bottom - 1),
                                                   (bubble.centerx + 6, bubble.bottom - 1), (bubble.centerx, bubble.bottom + 7)])
    surface.blit(text, text.get_rect(center=bubble.center))


def village_frame(surface: pygame.Surface, village: Village, bg: pygame.Surface, t: float, font: pygame.font.Font,
                  near: Npc | None) -> None:
    """The whole village for one frame (people sorted by y so the southern one is drawn on top)."""
    surface.blit(bg, (0, 0))
    animated(surface, village, t)
    people: list[tuple[float, Npc | Player]] = [(n.y, n) for n in village.npcs] + [(village.player.y, village.player)]
    for _, who in sorted(people, key=lambda pair: pair[0]):
        if isinstance(who, Npc):
            npc(surface, who, t, font)
        else:
            player(surface, who)
    if near is not None:
        talk_hint(surface, near, font)
