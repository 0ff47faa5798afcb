"""The demo's pure parts: the dialogue state machine, frame statistics, walking, word wrap, config."""

from __future__ import annotations

import pygame
import pytest
from npctalk.demo.config import DemoConfig
from npctalk.demo.dialogue import MAX_INPUT_CHARS, Dialogue, IllegalTransition, ReplyState
from npctalk.demo.frames import FrameStats, percentile
from npctalk.demo.server_proc import is_local, serve_command
from npctalk.demo.ui import wrap
from npctalk.demo.world import PLAYER_SPEED, Village


def test_dialogue_goes_thinking_streaming_idle_and_refuses_illegal_events() -> None:
    d = Dialogue("bram", "Bram", "Mind the sparks.")
    with pytest.raises(IllegalTransition, match="Cannot receive a token while the reply from Bram is idle"):
        d.token("x")
    d.type("Hi\x00 there\n")
    assert d.input == "Hi there" and d.take_line() == "Hi there" and d.input == ""
    assert d.take_line() is None  # nothing typed
    d.send("Hi there", "r1")
    assert d.thinking and d.busy and d.reply == ""
    d.type("again")
    assert d.take_line() is None and d.input == "again", "a line typed while waiting is kept, not sent"
    d.token("Hel")
    d.token("lo")
    assert d.state is ReplyState.STREAMING and d.reply == "Hello" and d.tokens == 2
    exchange = d.done("Hello", "stop")
    assert (exchange.npc, exchange.line, exchange.reply, d.state) == ("Bram", "Hi there", "Hello", ReplyState.IDLE)
    d.send("More?", "r2")
    d.fail("gone")
    assert d.state is ReplyState.FAILED and d.error == "gone" and not d.busy
    d.send("Retry", "r3")
    assert d.error == "" and d.thinking
    d.type("x" * (MAX_INPUT_CHARS + 50))
    assert len(d.input) == MAX_INPUT_CHARS


def test_frame_stats_percentiles_and_streaming_split() -> None:
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0 and percentile([1.0, 2.0, 3.0, 4.0], 99) == 4.0
    stats = FrameStats()
    for i in range(100):
        stats.record(0.016 if i % 10 else 0.050, 0.004, streaming=i >= 50)
    summary = stats.summary()
    assert summary is not None and summary.frames == 100 and summary.streaming_frames == 50
    assert summary.p50_ms == pytest.approx(16.0) and summary.max_ms == pytest.approx(50.0)
    assert summary.p99_ms == pytest.approx(50.0) and summary.work_p99_ms == pytest.approx(4.0)
    assert summary.idle_p99_ms == pytest.approx(50.0) and summary.streaming_p50_ms == pytest.approx(16.0)
    assert 20 < stats.fps < 63
    assert FrameStats().summary() is None
    with pytest.raises(ValueError):
        percentile([], 50)


def test_player_walks_at_its_speed_and_stops_at_walls() -> None:
    village = Village.ashford()
    p = village.player
    x0 = p.x
    village.move_player(1, 0, 0.5)
    assert p.x == pytest.approx(x0 + PLAYER_SPEED * 0.5)
    forge = village.buildings[0].rect
    p.x, p.y = forge.centerx, forge.bottom + 30
    for _ in range(60):
        village.move_player(0, -1, 1 / 60)
    assert not p.rect.colliderect(forge) and p.rect.top >= forge.bottom
    for _ in range(600):
        village.move_player(-1, 1, 1 / 60)
    assert p.rect.left >= 0 and p.rect.bottom <= 640  # the world's edge holds


def test_nearest_npc_only_within_talking_distance() -> None:
    village = Village.ashford()
    bram = village.npc("bram")
    village.player.x, village.player.y = bram.x + 40, bram.y
    assert village.nearest_npc() == bram
    village.player.x = bram.x + 200
    assert village.nearest_npc() is None
    with pytest.raises(KeyError, match="No NPC 'nobody'"):
        village.npc("nobody")


def test_wrap_fits_the_width_and_keeps_every_word() -> None:
    pygame.font.init()
    font = pygame.font.Font(None, 28)
    text = "Steel remembers every strike, friend. " * 6 + "Averyveryverylongwordwithoutanyspaces" * 3
    lines = wrap(text, font, 300)
    assert len(lines) > 3 and all(font.size(line)[0] <= 300 for line in lines)
    assert "".join(text.split()) == "".join("".join(lines).split())
    assert wrap("a\x00b", font, 300) == ["a b"]


def test_config_rejects_bad_values_and_the_server_command_is_local() -> None:
    with pytest.raises(ValueError, match="at least 640x480"):
        DemoConfig(width=320)
    with pytest.raises(ValueError, match="positive"):
        DemoConfig(fps=0)
    assert is_local("tcp://127.0.0.1:5555") and is_local("ipc:///tmp/x") and not is_local("tcp://10.0.0.2:5555")
    command = serve_command(DemoConfig(endpoint="tcp://127.0.0.1:6000", server_threads=2), with_memory=True)
    assert command[command.index("--bind") + 1] == "tcp://127.0.0.1:6000" and "--memory-db" in command
    assert command[command.index("--threads") + 1] == "2"
    assert "--memory-db" not in serve_command(DemoConfig(), with_memory=False)
