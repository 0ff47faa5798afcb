"""``npctalk``: the command line. Parses arguments and calls one API function per subcommand.

    npctalk chat --npc bram [--model BUNDLE]     talk to an NPC in the terminal (in-process)
    npctalk personas                             list the built-in personas
    npctalk serve --model BUNDLE [--bind ADDR]   ZeroMQ server for games (protocol: bindings/PROTOCOL.md)
    npctalk keygen DIR [--name NAME]             CURVE key pair for a server reachable from other machines
    npctalk export-onnx SOURCE ...               same as the export-onnx command (needs the export extra)
    npctalk finetune SOURCE --train ... -o DIR   fine-tune on dialogue JSONL (needs the export + finetune extras)
    npctalk evaluate BUNDLE... --data TEST -o DIR  BLEU/chrF/Dist/perplexity report (needs the finetune extra)
    npctalk evaluate --consistency [BUNDLE...]     persona consistency, memory × reranking (torch-free)
    npctalk demo [...]                           the pygame village demo, same as npctalk-demo (needs the demo extra)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, NpctalkError
from .paths import default_bundle_path, memory_db_path
from .sampling import CHAT_DEFAULTS, SearchOptions

log = logging.getLogger(__name__)


def _chat(args: argparse.Namespace) -> int:
    from .chat import run_terminal_chat

    return run_terminal_chat(
        bundle=args.model, npc=args.npc, personas_dir=args.personas,
        options=_search_options(args, args.max_new_tokens, seed=args.seed),
        provider=args.provider, stdin=sys.stdin, stdout=sys.stdout,
    )


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The sampling flags chat and serve share; defaults from ``CHAT_DEFAULTS``."""
    d = CHAT_DEFAULTS
    parser.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=d.top_k)
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    parser.add_argument("--no-repeat-ngram", type=int, default=d.no_repeat_ngram_size)
    parser.add_argument("--fact-bias", type=float, default=d.fact_bias,
                        help="logit bonus for the words that answer a question about a known fact "
                        "(persona, memory); 0 = off")


def _search_options(args: argparse.Namespace, max_new_tokens: int, seed: int | None = None) -> SearchOptions:
    """The one place sampling flags become ``SearchOptions``."""
    return SearchOptions(
        max_new_tokens=max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram, seed=seed, fact_bias=args.fact_bias,
    )


def _personas(args: argparse.Namespace) -> int:
    from .persona import builtin_personas

    for key, persona in builtin_personas().items():
        sys.stdout.write(f"{key:10s} {persona.name}, {persona.role}\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .memory import MemoryConfig
    from .scheduler import SchedulerConfig
    from .server import ServerConfig, serve

    if not args.verbose:
        logging.getLogger("npctalk").setLevel(logging.INFO)  # a server says where it listens and when it stops
    config = ServerConfig(
        bind=args.bind,
        scheduler=SchedulerConfig(max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                                  prefix_cache_bytes=args.prefix_cache_mb * 1024 * 1024, top_tokens=args.top_tokens,
                                  decode_ahead=args.decode_ahead),
        group_cached=args.group_cached_prompts,
        defaults=_search_options(args, min(args.default_max_new_tokens, args.max_new_tokens)),
        max_new_tokens=args.max_new_tokens, request_timeout_s=args.request_timeout,
        client_timeout_s=args.client_timeout, send_hwm=args.send_hwm, send_buffer=args.send_buffer, drain_timeout_s=args.drain_timeout,
        personas_dir=args.personas, curve=_curve(args),
        memory=MemoryConfig(path=str(args.memory_db or memory_db_path()), recent_turns=args.memory_turns,
                            synchronous=args.memory_sync, embeddings=args.memory_embeddings),
    )
    return serve(args.model or default_bundle_path(), config, provider=args.provider,
                 intra_op_threads=server_threads(args.threads), spin=args.spin, slot_context=args.slot_context)


def server_threads(requested: int | None) -> int:
    """``--threads``, or all cores but one: a game on the same machine keeps a core for its frame loop."""
    return requested or max(1, (os.cpu_count() or 2) - 1)


def _curve(args: argparse.Namespace) -> Any:
    from .security import CurveServerConfig

    if args.curve_secret_key is None:
        if args.curve_clients is not None:
            raise ConfigError("--curve-clients needs --curve-secret-key (the server's NAME.key_secret file).")
        return None
    return CurveServerConfig(args.curve_secret_key, args.curve_clients)


def _keygen(args: argparse.Namespace) -> int:
    from .security import generate

    public, secret = generate(args.directory, args.name)
    sys.stdout.write(f"public key: {public}\nsecret key: {secret} (keep it private)\n")
    return 0


def _consistency_main(argv: Sequence[str]) -> int:
    """``npctalk evaluate --consistency BUNDLE… [-o DIR]``: persona consistency (engine/consistency.py)."""
    from .consistency import DATA_DIR, SETTINGS, evaluate, load_scripts, markdown, rejudge, write_report

    p = argparse.ArgumentParser(prog="npctalk evaluate --consistency",
                                description="Scripted conversations through an in-process server; share of probes "
                                "answered in character, per memory on/off × reranking on/off.")
    p.add_argument("bundles", nargs="*", type=Path, help=f"bundle folder(s) (default: {default_bundle_path()})")
    p.add_argument("--scripts", type=Path, default=DATA_DIR, help="folder of consistency scripts (*.toml)")
    p.add_argument("-o", "--output", type=Path, default=Path("bench/results"), help="folder for the .json/.md report")
    p.add_argument("--candidates", type=int, default=4, help="reranking candidates in the rerank-on settings")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seeds", type=int, default=1, help="run every script this many times per setting, other fixed seeds")
    p.add_argument("--settings", nargs="+", default=[f"{m}/{r}" for m, r in SETTINGS],
                   help="memory/rerank pairs, e.g. on/off off/off (default: all four)")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--fact-bias", type=float, default=None,
                   help="the server's fact steering bias (default: the server's, 0 = off)")
    p.add_argument("--tag", default="", help="appended to the report's file name (consistency-MODEL-DATE-TAG)")
    p.add_argument("--rejudge", type=Path, default=None, metavar="REPORT.json",
                   help="judge a saved report's replies again under the scripts' current rules (no model run)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(list(argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    settings = []
    for item in args.settings:
        memory, _, rerank = item.partition("/")
        if memory not in ("on", "off") or rerank not in ("on", "off"):
            sys.stderr.write(f"error: --settings takes memory/rerank pairs of on|off, got {item!r}\n")
            return 2
        settings.append((memory, rerank))
    try:
        scripts = load_scripts(args.scripts)
        if args.rejudge is not None:
            import json

            report = rejudge(json.loads(args.rejudge.read_text(encoding="utf-8")), scripts)
            json_path, _ = write_report(report, args.output)
            sys.stdout.write(markdown(report).split("\n## ")[0] + f"\n→ {json_path}\n")
            return 0
        for bundle in args.bundles or [default_bundle_path()]:
            def checkpoint(partial: dict) -> None:
                path, _ = write_report(partial, args.output, tag=args.tag)
                logging.getLogger(__name__).info("%d of %d settings done: report so far in %s",
                                                 len(partial["settings"]), len(settings), path)

            report = evaluate(bundle, scripts, settings=settings, candidates=args.candidates,
                              max_new_tokens=args.max_new_tokens, provider=args.provider, threads=args.threads,
                              seeds=args.seeds, fact_bias=args.fact_bias, checkpoint=checkpoint)
            json_path, _ = write_report(report, args.output, tag=args.tag)
            sys.stdout.write(markdown(report).split("\n## ")[0] + f"\n→ {json_path}\n")
    except NpctalkError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .scheduler_config import DEFAULT_PREFILL_CHUNK
    from .topk import DEFAULT_TOP_TOKENS

    parser = argparse.ArgumentParser(prog="npctalk", description="NPC dialogue engine for games.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="talk to an NPC in this terminal")
    chat.add_argument("--npc", default="bram", help="persona name (built-in or in --personas); default bram")
    chat.add_argument("--model", type=Path, default=None,
                      help=f"model bundle folder (default: {default_bundle_path()})")
    chat.add_argument("--personas", type=Path, default=None, help="folder of persona .toml files")
    chat.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    chat.add_argument("--max-new-tokens", type=int, default=CHAT_DEFAULTS.max_new_tokens)
    _add_sampling_flags(chat)
    chat.add_argument("--seed", type=int, default=None)
    chat.set_defaults(func=_chat)

    personas = sub.add_parser("personas", help="list the built-in personas")
    personas.set_defaults(func=_personas)

    srv = sub.add_parser("serve", help="serve NPC dialogue to games over ZeroMQ")
    srv.add_argument("--model", type=Path, default=None, help=f"model bundle folder (default: {default_bundle_path()})")
    srv.add_argument("--bind", default="tcp://127.0.0.1:5555", help="ZeroMQ endpoint (tcp://HOST:PORT or ipc://PATH)")
    srv.add_argument("--personas", type=Path, default=None, help="folder of persona .toml files to preload")
    srv.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    srv.add_argument("--threads", type=int, default=None,
                     help="ONNX Runtime intra-op threads (default: all cores but one, which the game keeps)")
    srv.add_argument("--spin", action="store_true",
                     help="let ONNX Runtime's worker threads busy-wait between operators (off by default: beside a "
                          "60 fps game on 2 cores, spinning made 13.5%% of frames late for no faster replies; "
                          "bench/results/threads-*)")
    srv.add_argument("--max-batch", type=int, default=32, help="streams decoded together")
    srv.add_argument("--slot-context", type=int, default=None,
                     help="slots-layout (CUDA) bundles: tokens each stream's KV slot holds (default: the model's "
                          "context, at most 2048); the KV of max-batch + 4 slots is allocated at start")
    srv.add_argument("--max-queue", type=int, default=64, help="streams that may wait; more are answered busy")
    srv.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                     help="prompt tokens prefilled per engine step, so a long prompt never stalls running streams "
                     "(default %(default)s; 0: whole prompts)")
    srv.add_argument("--top-tokens", type=int, default=DEFAULT_TOP_TOKENS,
                     help="a sampled decode step takes each stream's this many best logits instead of the whole "
                          "vocabulary (on the GPU only these leave the device; the whole row only where they cannot "
                          "decide the token; same tokens either way); 0: always the whole row (default %(default)s)")
    srv.add_argument("--decode-ahead", action="store_true",
                     help="run each decode step on a worker thread while the engine loop turns the last step's tokens "
                          "into messages (same replies; meant for a GPU, where the step is device time; on a 2-core CPU "
                          "it measured slower)")
    srv.add_argument("--group-cached-prompts", choices=["auto", "on", "off"], default="auto",
                     help="read says whose persona prefix is cached together, whole, instead of each player's turn "
                          "alone after the prefix's snapshot (slots bundles). auto: a GPU server times both ways at "
                          "start and takes the cheaper (a GPU's read costs its latency more than its tokens); a CPU "
                          "reads turns alone. Reading together makes a default --prefill-chunk whole prompts (0)")
    srv.add_argument("--prefix-cache-mb", type=int, default=256,
                     help="memory for the NPCs' persona-prefix KV caches in MiB, on the model's device (GPU memory for a CUDA bundle; 0: off)")
    srv.add_argument("--max-new-tokens", type=int, default=256, help="the most tokens one say may ask for")
    srv.add_argument("--default-max-new-tokens", type=int, default=64, help="reply length when a say sets none")
    srv.add_argument("--request-timeout", type=float, default=60.0, help="seconds from receipt to done")
    srv.add_argument("--client-timeout", type=float, default=15.0,
                     help="seconds a client with streams may stay silent before they are cancelled")
    srv.add_argument("--send-hwm", type=int, default=1000, help="messages queued per client before it counts as stuck")
    srv.add_argument("--send-buffer", type=int, default=0, help="kernel send buffer per client in bytes (0: OS default)")
    srv.add_argument("--drain-timeout", type=float, default=10.0, help="seconds running streams may finish on SIGTERM")
    srv.add_argument("--curve-secret-key", type=Path, default=None,
                     help="encrypt with CURVE using this server NAME.key_secret file (see `npctalk keygen`)")
    srv.add_argument("--curve-clients", type=Path, default=None,
                     help="folder of allowed clients' NAME.key files; without it any client knowing the server key connects")
    srv.add_argument("--memory-db", default=None,
                     help=f"SQLite file of NPC memories, or :memory: to keep none (default: {memory_db_path()})")
    srv.add_argument("--memory-turns", type=int, default=16,
                     help="lines per NPC and player kept verbatim; older ones go into a rolling summary")
    srv.add_argument("--memory-sync", choices=("full", "normal"), default="full",
                     help="full: a turn is on disk before done (survives power loss); normal: faster, survives crashes")
    srv.add_argument("--memory-embeddings", choices=("auto", "on", "off"), default="auto",
                     help="also retrieve facts by sentence embeddings (auto: when npctalk[memory-embeddings] is installed)")
    _add_sampling_flags(srv)
    srv.set_defaults(func=_serve)

    keygen = sub.add_parser("keygen", help="write a CURVE key pair (NAME.key, NAME.key_secret) for serve/clients")
    keygen.add_argument("directory", type=Path, help="folder to write the two files into")
    keygen.add_argument("--name", default="server", help="file name stem (default: server)")
    keygen.set_defaults(func=_keygen)

    # Parsed by export-onnx itself; listed here so `npctalk --help` shows it.
    sub.add_parser("export-onnx", help="build a model bundle (see `export-onnx --help`)", add_help=False)
    sub.add_parser("finetune", help="fine-tune a model on dialogue JSONL (see `npctalk finetune --help`)", add_help=False)
    sub.add_parser("evaluate", help="score bundles on a test JSONL (see `npctalk evaluate --help`)", add_help=False)
    sub.add_parser("demo", help="the pygame village demo (see `npctalk demo --help`)", add_help=False)
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
    if argv[:1] == ["demo"]:  # pygame is imported by the demo only, never by the runtime
        try:
            from npctalk.demo.__main__ import main as demo_main
        except ImportError as exc:
            sys.stderr.write(f"error: the demo is not installed: pip install 'npctalk[demo]' ({exc})\n")
            return 1
        return demo_main(argv[1:])
    if argv[:1] == ["evaluate"] and "--consistency" in argv:  # torch-free: no finetune extra needed
        return _consistency_main([a for a in argv[1:] if a != "--consistency"])
    if argv and argv[0] in ("finetune", "evaluate"):
        try:
            from npctalk.finetune.cli import main as finetune_main
        except ImportError as exc:
            sys.stderr.write(f"error: {argv[0]} needs the finetune extra: pip install 'npctalk[export,finetune]' ({exc})\n")
            return 1
        return finetune_main(argv[0], argv[1:])
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
