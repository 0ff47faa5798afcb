"""Credits and title screens, walking, and the headless main command (no display, real server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pygame
import pytest
from demo_helpers import nobody_at, pixel_spread, run_script
from npctalk.demo.game import Game
from npctalk.demo.notices import credits_lines, find_notices
from npctalk.demo.script import Frames, Press, Screenshot, WalkTo
from server_process import free_tcp_endpoint

ROOT = Path(__file__).resolve().parents[2]


def test_credits_screen_shows_the_attribution_notices(make_game: Callable[..., Game], tmp_path: Path) -> None:
    game = make_game()
    run_script(game, [Press(pygame.K_c), Frames(2)])
    assert game.scene.value == "credits"
    seen = set(game.shown_credits)
    shot = tmp_path / "credits.png"
    run_script(game, [Screenshot(shot)])
    for _ in range(20):  # scroll to the end, collecting every line drawn
        run_script(game, [Press(pygame.K_DOWN)])
        seen |= set(game.shown_credits)
    text = "\n".join(seen)
    notices = (ROOT / "LICENSE-NOTICES").read_text(encoding="utf-8")
    for needle in ("DialoGPT", "SmolLM2-135M-Instruct", "Apache License", "onnxruntime", "pygame", "MIT License"):
        assert needle in notices and needle in text, needle
    assert {line.strip() for line in notices.splitlines() if line.strip()} <= {line.strip() for line in game.credit_lines}
    std, colours = pixel_spread(shot)
    assert std > 10 and colours > 2, f"credits screenshot looks blank: std {std:.1f}, {colours} colours"
    run_script(game, [Press(pygame.K_ESCAPE)])
    assert game.scene.value == "title"


def test_notices_are_found_and_a_bad_path_is_reported(tmp_path: Path) -> None:
    assert find_notices().read_text(encoding="utf-8") == (ROOT / "LICENSE-NOTICES").read_text(encoding="utf-8")
    own = tmp_path / "NOTICES"
    own.write_text("Made with care.\n", encoding="utf-8")
    assert "Made with care." in credits_lines(own)
    lines = credits_lines(tmp_path / "missing")  # falls back to the installed notices
    assert any("DialoGPT" in line for line in lines)


@pytest.mark.parametrize("npc", ["bram", "elda", "tobin"])
def test_walking_reaches_each_npc_around_the_buildings(npc: str, make_game: Callable[..., Game]) -> None:
    game = make_game()
    start = (game.village.player.x, game.village.player.y)
    run_script(game, [Press(pygame.K_RETURN), WalkTo(npc), Press(pygame.K_e)], timeout_s=30)
    assert (game.village.player.x, game.village.player.y) != start
    assert game.scene.value == "talk" and game.dialogue is not None and game.dialogue.npc_key == npc
    assert game.dialogue.reply, "the dialogue opens with the persona's greeting"
    assert not any(game.village.player.rect.colliderect(block) for block in game.village.blocks)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="no-display detection is for Linux (DISPLAY/WAYLAND_DISPLAY)")
def test_headless_main_command_plays_a_conversation_and_exits_0(gpt2_bundle: Path, tmp_path: Path) -> None:
    endpoint, shot = free_tcp_endpoint(), tmp_path / "shot.png"
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER")}
    env["NPCTALK_HOME"] = str(tmp_path / "home")
    command = [sys.executable, "-m", "npctalk.demo", "--model", str(gpt2_bundle), "--endpoint", endpoint,
               "--threads", "1", "--screenshot", str(shot), "--say", "bram:Hello, smith!", "--max-new-tokens", "24"]
    out = subprocess.run(command, check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "headless" in out.stderr and "Transcript: Bram <- 'Hello, smith!'" in out.stderr
    assert "Frame times:" in out.stderr and "Stopped the engine" in out.stderr
    std, colours = pixel_spread(shot)
    assert std > 20 and colours > 50
    assert nobody_at(endpoint), "the demo left its server running"
    assert (tmp_path / "home" / "demo" / "server.log").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_sigterm_ends_the_demo_and_stops_its_server(gpt2_bundle: Path, tmp_path: Path) -> None:
    endpoint = free_tcp_endpoint()
    env = dict(os.environ, NPCTALK_HOME=str(tmp_path / "home"))
    command = [sys.executable, "-m", "npctalk.demo", "--headless", "--model", str(gpt2_bundle), "--endpoint", endpoint,
               "--threads", "1", "--say", "bram:Tell me everything.", "--max-new-tokens", "256"]
    demo = subprocess.Popen(command, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        assert demo.stderr is not None
        for line in demo.stderr:  # blocks on the demo's log, which the demo writes as it goes
            if "Engine online" in line:
                break
        else:
            raise AssertionError(f"the demo exited ({demo.wait()}) before its engine came online")
        demo.send_signal(signal.SIGTERM)
        rest = demo.communicate(timeout=30)[1]
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert "Stopped the engine" in rest and "Frame times:" in rest
    assert nobody_at(endpoint), "the demo's server outlived it"


def test_npctalk_demo_subcommand_delegates_to_the_demo() -> None:
    out = subprocess.run([sys.executable, "-m", "npctalk.engine.cli", "demo", "--help"], check=False,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--headless" in out.stdout and "--say NPC:LINE" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "npctalk.engine.cli", "demo", "--say", "nocolon"], check=False,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected NPC:LINE" in bad.stderr
