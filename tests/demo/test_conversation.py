"""Scripted keys drive a conversation with a real server; the reply streams into the dialogue box."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pygame
from demo_helpers import LONG_REPLY_TOKENS, STREAMING_FRAME_BOUND_S, Frame, pixel_spread, run_script, run_until, talk_steps
from npctalk.demo.game import Game
from npctalk.demo.script import Press, Screenshot, Type, WalkTo
from npctalk.demo.ui import printable
from server_process import ServerProcess


def test_streamed_reply_grows_in_the_dialogue_box(server: ServerProcess, make_game: Callable[..., Game],
                                                  tmp_path: Path) -> None:
    game = make_game(endpoint=server.endpoint, max_new_tokens=LONG_REPLY_TOKENS)
    frames: list[Frame] = []
    run_script(game, talk_steps("bram", "Hello there, smith!"), frames=frames)
    run_until(game, lambda g: g.dialogue is not None and g.dialogue.reply_id is None, 60, frames)
    shot = tmp_path / "talk.png"
    run_script(game, [Screenshot(shot)])

    talk = [f for f in frames if f.scene == "talk"]
    thinking = [i for i, f in enumerate(talk) if f.thinking]
    text = [i for i, f in enumerate(talk) if f.state in ("streaming", "idle") and f.reply and i > (thinking or [0])[0]]
    assert thinking, "the thinking indicator was never drawn"
    assert text and thinking[0] < text[0], "text appeared before the thinking indicator"
    assert all(talk[i].reply == "" for i in thinking), "thinking was drawn over reply text"
    # The reply grows over several frames, each frame's text a prefix of the next.
    replies = [f.reply for f in talk[text[0]:]]
    assert len(set(replies)) >= 3, f"the reply arrived in {len(set(replies))} frames; streaming means several"
    assert all(b.startswith(a) for a, b in itertools.pairwise(replies))
    final = game.dialogue.reply if game.dialogue else ""
    assert game.transcript and game.transcript[-1].reply == final and game.transcript[-1].npc == "Bram"
    # What the box draws is the reply's text (its newest lines).
    normalized = " ".join(printable(final).split())  # control characters are drawn as blanks
    assert talk[-1].shown and all(" ".join(line.split()) in normalized for line in talk[-1].shown)
    streaming = [f.interval_s for f in frames if f.state in ("thinking", "streaming")]
    assert streaming and max(streaming) < STREAMING_FRAME_BOUND_S, f"longest frame while streaming: {max(streaming):.3f} s"
    std, colours = pixel_spread(shot)
    assert std > 20 and colours > 50, f"screenshot looks blank: std {std:.1f}, {colours} colours"


def test_typing_e_to_open_talk_does_not_type_it_and_esc_cancels(server: ServerProcess,
                                                                 make_game: Callable[..., Game]) -> None:
    game = make_game(endpoint=server.endpoint, max_new_tokens=LONG_REPLY_TOKENS)
    run_script(game, talk_steps("elda", "What is the news?")[:-2])
    assert game.scene.value == "talk" and game.dialogue is not None and game.dialogue.input == ""
    run_script(game, [Type("Any news?"), Press(pygame.K_BACKSPACE)])
    assert game.dialogue.input == "Any news"
    run_script(game, [Press(pygame.K_RETURN)])
    reply_id = game.dialogue.reply_id
    run_until(game, lambda g: g.dialogue is not None and g.dialogue.state.value == "streaming", 30)
    run_script(game, [Press(pygame.K_ESCAPE)])
    assert game.scene.value == "village" and game.dialogue is None
    # The server ends the cancelled reply; the game forgets it without showing it anywhere.
    run_until(game, lambda g: reply_id not in g.replies, 30)
    assert game.dialogues["elda"].state.value == "failed" and "walked away" in game.dialogues["elda"].error


def test_line_typed_while_the_engine_is_absent_is_kept(make_game: Callable[..., Game]) -> None:
    game = make_game()  # nothing listens at its endpoint, and it starts nothing
    run_script(game, [Press(pygame.K_RETURN), WalkTo("tobin"), Press(pygame.K_e), Type("Open the gate"),
                      Press(pygame.K_RETURN)])
    assert game.dialogue is not None and game.dialogue.input == "Open the gate" and not game.dialogue.busy
    assert "cannot hear you" in game.toast and not game.link.online
