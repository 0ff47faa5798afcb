"""The engine going away: mid-reply kills, restarts, and the server the demo starts and stops itself."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pygame
import pytest
import zmq
from demo_helpers import (LONG_REPLY, LONG_REPLY_TOKENS, STREAMING_FRAME_BOUND_S, Frame, kill_at_first_token, nobody_at, reply_over, run_script, run_until,
                          skip_unless_cut, talk_steps)
from npctalk.demo.game import Game
from npctalk.demo.link import LinkState
from npctalk.demo.script import Press, Type
from server_process import LONG_STREAMS, ServerProcess, free_tcp_endpoint, recv, send

# The server is killed at the reply's first token (kill_at_first_token). Waiting for the frame after it
# let the old server finish first on a fast VM: a 256-token reply, or one the tiny model ended on a
# stop string after 185 tokens (the test saw "idle", not "failed").


def test_server_killed_mid_reply_shows_a_message_and_reconnects(gpt2_bundle: Path, tmp_path: Path,
                                                               make_game: Callable[..., Game],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    first = ServerProcess(gpt2_bundle, tmp_path, *LONG_STREAMS, *LONG_REPLY).start()
    try:
        game = make_game(endpoint=first.endpoint, max_new_tokens=LONG_REPLY_TOKENS, reply_timeout_s=2.0)
        killed = kill_at_first_token(monkeypatch, lambda: first.signal(signal.SIGKILL))
        run_script(game, talk_steps("bram", "Tell me a long story."))
        run_until(game, lambda g: killed(), 30)
        frames: list[Frame] = []
        run_until(game, reply_over, 15, frames)
        skip_unless_cut(game)
    finally:
        first.stop()
    d = game.dialogue
    assert d is not None and d.state.value == "failed" and "went away" in d.error, d.error
    assert d.reply, "what streamed before the loss stays on screen"
    assert game.toast == d.error
    assert max(f.interval_s for f in frames) < STREAMING_FRAME_BOUND_S, "a frame froze while the server was gone"
    run_until(game, lambda g: g.link.state is LinkState.LOST, 10)
    assert game.step(), "the game keeps running without its engine"

    second = ServerProcess(gpt2_bundle, tmp_path, *LONG_STREAMS, *LONG_REPLY, endpoint=first.endpoint).start()
    try:
        run_until(game, lambda g: g.link.online, 30)
        run_script(game, [Type("Are you back?"), Press(pygame.K_RETURN)])
        run_until(game, reply_over, 30)
    finally:
        second.stop()
    assert game.dialogue is not None and game.dialogue.state.value == "idle" and not game.dialogue.error
    assert [e.line for e in game.transcript] == ["Are you back?"]


def test_demo_starts_its_own_server_restarts_it_mid_reply_and_stops_it(gpt2_bundle: Path, tmp_path: Path,
                                                                       make_game: Callable[..., Game],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = free_tcp_endpoint()
    game = make_game(endpoint=endpoint, autostart=True, model=gpt2_bundle, memory_db=tmp_path / "memory.sqlite",
                     server_threads=1, server_args=(*LONG_STREAMS, *LONG_REPLY), max_new_tokens=LONG_REPLY_TOKENS,
                     reply_timeout_s=30.0)
    run_until(game, lambda g: g.link.online, 60)
    server = game.link.server
    assert server is not None and server.process is not None and server.exited is None
    # The engine crashes mid-reply: the reply fails at once, the demo starts it again.
    killed = kill_at_first_token(monkeypatch, server.process.kill)
    run_script(game, talk_steps("tobin", "Who goes there?"))
    run_until(game, lambda g: killed(), 30)
    frames: list[Frame] = []
    run_until(game, reply_over, 5, frames)  # well before the 30 s silence timeout
    skip_unless_cut(game)
    d = game.dialogue
    assert d is not None and d.state.value == "failed" and "went away" in d.error and d.reply
    assert max(f.interval_s for f in frames) < STREAMING_FRAME_BOUND_S
    run_until(game, lambda g: g.link.online, 60)
    assert game.link.restarts == 1 and game.link.server is not None and game.link.server.exited is None
    run_script(game, [Type("Again?"), Press(pygame.K_RETURN)])
    run_until(game, reply_over, 30)
    assert [e.line for e in game.transcript] == ["Again?"] and game.dialogue.state.value == "idle"

    process = game.link.server.process
    assert process is not None
    remembers = game.link.server.remembers
    game.close()
    assert process.poll() is not None, "closing the demo stops the server it started"
    assert nobody_at(endpoint)
    if remembers:  # serve has --memory-db: the demo gave it its own database
        assert (tmp_path / "memory.sqlite").exists()


def test_missing_bundle_is_a_message_then_a_server_started_by_hand_is_used(
        gpt2_bundle: Path, tmp_path: Path, make_game: Callable[..., Game]) -> None:
    game = make_game(autostart=True, model=tmp_path / "no-such-bundle")
    run_until(game, lambda g: g.link.state is LinkState.FAILED, 15)
    assert "No model bundle" in game.link.message and "export-onnx default" in game.link.message
    run_script(game, [Press(pygame.K_RETURN)] * 3)
    assert game.scene.value == "village", "the game keeps running"
    by_hand = ServerProcess(gpt2_bundle, tmp_path, endpoint=game.config.endpoint).start()
    try:
        run_until(game, lambda g: g.link.online, 15)
    finally:
        by_hand.stop()
    assert game.link.server is None or game.link.server.process is None, "the demo started nothing"


def test_npcs_remember_the_player_across_demo_restarts(gpt2_bundle: Path, tmp_path: Path,
                                                       make_game: Callable[..., Game]) -> None:
    db = tmp_path / "demo-memory.sqlite"
    first = make_game(autostart=True, model=gpt2_bundle, memory_db=db, server_threads=1, max_new_tokens=8)
    run_until(first, lambda g: g.link.online, 60)
    if first.link.server is None or not first.link.server.remembers:
        pytest.skip("this npctalk serve has no --memory-db")
    run_script(first, talk_steps("bram", "My name is Wren."))
    run_until(first, reply_over, 30)
    first.close()

    second = make_game(autostart=True, model=gpt2_bundle, memory_db=db, server_threads=1)
    run_until(second, lambda g: g.link.online, 60)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(second.config.endpoint)
    try:
        send(sock, op="memory.get", id="m1", npc="bram", player=second.config.player)
        memory = recv(sock, 10)
    finally:
        sock.close()
    assert memory["type"] == "ok", memory
    assert "My name is Wren." in repr(memory["turns"]), memory
    run_until(second, lambda g: "bram" in g.link.remembered, 15)
    run_script(second, talk_steps("bram", "")[:-2])
    assert second.dialogue is not None and "(Bram remembers you: 1 earlier exchange.)" in second.dialogue.reply


def test_reply_orphaned_by_a_quick_server_restart_fails_at_the_first_answered_heartbeat(
        gpt2_bundle: Path, tmp_path: Path, make_game: Callable[..., Game], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Restarted within the silence timeout, the new server answers pings but never finishes the old reply:
    the client's ping lists the reply and the new server says it does not hold it (protocol ``ping.streams``);
    the demo's own deadline check stays as a fallback for servers that do not answer ``unknown``."""
    args = (*LONG_STREAMS, "--request-timeout", "2", *LONG_REPLY)
    first = ServerProcess(gpt2_bundle, tmp_path, *args).start()
    second = ServerProcess(gpt2_bundle, tmp_path, *args, endpoint=first.endpoint)
    try:
        game = make_game(endpoint=first.endpoint, max_new_tokens=LONG_REPLY_TOKENS, reply_timeout_s=8.0)
        killed = kill_at_first_token(monkeypatch, lambda: first.signal(signal.SIGKILL))
        run_script(game, talk_steps("elda", "Tell me every rumour."))
        run_until(game, lambda g: killed(), 30)
        second.start()
        frames: list[Frame] = []
        run_until(game, reply_over, 20, frames)
        skip_unless_cut(game)
        d = game.dialogue
        assert d is not None and d.state.value == "failed" and d.reply
        assert "The server no longer has reply" in caplog.text
        run_until(game, lambda g: g.link.online, 20)  # the demo re-greets the new server after a lost reply
        # The first frame's interval holds the test's own wait for the second server to start.
        assert max(f.interval_s for f in frames[1:]) < STREAMING_FRAME_BOUND_S
        run_script(game, [Type("Still there?"), Press(pygame.K_RETURN)])
        run_until(game, reply_over, 30)
        assert [e.line for e in game.transcript] == ["Still there?"]
    finally:
        first.stop()
        second.stop()
