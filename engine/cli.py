"""``npctalk``: the command line. Parses arguments and calls one API function per subcommand.

    npctalk chat --npc bram [--model BUNDLE]     talk to an NPC in the terminal (in-process)
    npctalk personas                             list the built-in personas
    npctalk export-onnx SOURCE ...               same as the export-onnx command (needs the export extra)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import NpctalkError
from .paths import default_bundle_path

log = logging.getLogger(__name__)


def _chat(args: argparse.Namespace) -> int:
    from .chat import run_terminal_chat
    from .sampling import SearchOptions

    options = SearchOptions(
        max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram, seed=args.seed,
    )
    return run_terminal_chat(
        bundle=args.model, npc=args.npc, personas_dir=args.personas, options=options,
        provider=args.provider, stdin=sys.stdin, stdout=sys.stdout,
    )


def _personas(args: argparse.Namespace) -> int:
    from .persona import builtin_personas

    for key, persona in builtin_personas().items():
        sys.stdout.write(f"{key:10s} {persona.name}, {persona.role}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npctalk", description="NPC dialogue engine for games.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="talk to an NPC in this terminal")
    chat.add_argument("--npc", default="bram", help="persona name (built-in or in --personas); default bram")
    chat.add_argument("--model", type=Path, default=None,
                      help=f"model bundle folder (default: {default_bundle_path()})")
    chat.add_argument("--personas", type=Path, default=None, help="folder of persona .toml files")
    chat.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    chat.add_argument("--max-new-tokens", type=int, default=96)
    chat.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    chat.add_argument("--top-k", type=int, default=40)
    chat.add_argument("--top-p", type=float, default=0.9)
    chat.add_argument("--repetition-penalty", type=float, default=1.15)
    chat.add_argument("--no-repeat-ngram", type=int, default=4)
    chat.add_argument("--seed", type=int, default=None)
    chat.set_defaults(func=_chat)

    personas = sub.add_parser("personas", help="list the built-in personas")
    personas.set_defaults(func=_personas)

    # Parsed by export-onnx itself; listed here so `npctalk --help` shows it.
    sub.add_parser("export-onnx", help="build a model bundle (see `export-onnx --help`)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export-onnx":
        try:
            from npctalk.export.cli import main as export_main
        except ImportError as exc:
            sys.stderr.write(f"error: export-onnx needs the export extra: pip install 'npctalk[export]' ({exc})\n")
            return 1
        return export_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args))
    except NpctalkError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
