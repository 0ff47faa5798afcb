"""``npctalk-demo`` (or ``python -m demo_game`` in a checkout): the Ashford village demo.

With a display it opens a window and you play. Without one (Linux with neither DISPLAY nor
WAYLAND_DISPLAY, or ``--headless``) it plays a scripted conversation on SDL's dummy video driver,
saves a screenshot, logs the transcript and frame times, and exits 0 when every line got a reply,
so the command proves itself on a headless machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from npctalk.engine.protocol import DEFAULT_ENDPOINT

from .config import DemoConfig, demo_home

log = logging.getLogger(__name__)


def no_display() -> bool:
    """True on Linux without an X11 or Wayland display (a server, a container, CI)."""
    return sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _line(value: str) -> tuple[str, str]:
    npc, sep, text = value.partition(":")
    if not sep or not npc.strip() or not text.strip():
        raise argparse.ArgumentTypeError(f"expected NPC:LINE (e.g. bram:Hello), got {value!r}")
    return npc.strip(), text.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npctalk-demo", description="Ashford: a pygame village whose NPCs talk "
                                     "through npctalk serve. Arrows/WASD walk, E talks, Enter sends, Esc closes, C credits.")
    parser.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help=f"npctalk serve endpoint (default {DEFAULT_ENDPOINT})")
    parser.add_argument("--model", type=Path, default=None, help="bundle for the server the demo starts "
                        "(default: the default bundle built by `export-onnx default`)")
    parser.add_argument("--no-autostart", action="store_true", help="never start a server; wait for one")
    parser.add_argument("--memory-db", type=Path, default=None,
                        help=f"NPC memory database for a started server (default {demo_home() / 'memory.sqlite'})")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads of a started server")
    parser.add_argument("--serve-args", type=shlex.split, default=[], metavar="'FLAGS'",
                        help="more flags for a server the demo starts, e.g. '--provider cuda --max-batch 8'")
    parser.add_argument("--player", default=DemoConfig.player, help="the player id NPCs remember")
    parser.add_argument("--max-new-tokens", type=int, default=DemoConfig.max_new_tokens, help="reply length")
    parser.add_argument("--fps", type=int, default=DemoConfig.fps, help="frame-rate cap")
    parser.add_argument("--headless", action="store_true", help="play the scripted conversation on the dummy "
                        "video driver even when a display exists")
    parser.add_argument("--script", action="store_true", help="play the scripted conversation in the window")
    parser.add_argument("--say", type=_line, action="append", default=None, metavar="NPC:LINE",
                        help="a scripted line (repeatable); default: one line to bram, one to elda")
    parser.add_argument("--screenshot", type=Path, default=None,
                        help=f"where the scripted run saves its screenshot (default {demo_home() / 'screenshot.png'})")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    headless = args.headless or no_display()
    if headless:
        os.environ["SDL_VIDEODRIVER"] = "dummy"  # must be set before pygame initialises video
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    logging.getLogger("npctalk.client").setLevel(logging.WARNING)  # hello probes of an absent server are routine
    try:
        config = DemoConfig(endpoint=args.endpoint, model=args.model, autostart=not args.no_autostart,
                            memory_db=args.memory_db, server_threads=args.threads,
                            server_args=tuple(args.serve_args), player=args.player,
                            max_new_tokens=args.max_new_tokens, fps=args.fps)
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    try:
        from .game import Game
        from .script import DEFAULT_LINES, Script, ScriptError, conversation
    except ImportError as exc:
        sys.stderr.write(f"error: the demo needs pygame: pip install 'npctalk[demo]' ({exc})\n")
        return 1

    lines = args.say or list(DEFAULT_LINES)
    scripted = headless or args.script
    script = Script(conversation(lines, args.screenshot or demo_home() / "screenshot.png")) if scripted else None
    if headless:
        log.info("No display: playing a scripted conversation headless (SDL_VIDEODRIVER=dummy).")
    game = Game(config, script)
    # SIGTERM ends the loop like closing the window, so the server the demo started is stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: setattr(game, "running", False))
    try:
        game.run()
    except ScriptError as exc:
        log.error("The scripted conversation failed: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        game.close()
    if not scripted:
        return 0
    for exchange in game.transcript:
        log.info("Transcript: %s <- %r -> %r (%s)", exchange.npc, exchange.line, exchange.reply, exchange.finish_reason)
    if len(game.transcript) != len(lines):
        log.error("Only %d of %d scripted lines got a reply.", len(game.transcript), len(lines))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
