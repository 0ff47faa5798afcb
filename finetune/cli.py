"""``npctalk finetune`` and ``npctalk evaluate``: parse arguments, call one API function each.

    npctalk finetune default --train data/npc_dialogue/train.jsonl --valid data/npc_dialogue/valid.jsonl \\
        -o runs/smollm2-npc                          # then: export-onnx runs/smollm2-npc -o bundles/smollm2-npc
    npctalk finetune default ... -o runs/smollm2-npc --resume latest
    npctalk evaluate bundles/smollm2-135m-instruct bundles/smollm2-npc --data data/npc_dialogue/test.jsonl -o results/

Progress goes to stderr through ``logging`` (and a progress bar on a terminal). Exit codes: 0 done,
1 failed (one ``error: …`` line), 2 bad usage, 130 interrupted (``finetune`` keeps its last checkpoint).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from npctalk.engine.errors import NpctalkError

from .config import DEVICES, PRECISIONS, SCHEDULES, SELECT_BY, FinetuneConfig

log = logging.getLogger("npctalk.finetune")
_NOISY = ("transformers", "torch", "urllib3", "huggingface_hub")


def finetune_parser() -> argparse.ArgumentParser:
    d = FinetuneConfig()
    p = argparse.ArgumentParser(prog="npctalk finetune", description="Fine-tune a dialogue model on prompt/completion "
                                "JSONL (loss on the NPC's reply only); the output folder goes to export-onnx.")
    p.add_argument("source", help="Hugging Face model folder, hub id, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--train", type=Path, required=True, help="training JSONL (see data/npc_dialogue/README.md)")
    p.add_argument("--valid", type=Path, required=True, help="validation JSONL (eval loss and BLEU)")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder for the fine-tuned model and checkpoints")
    p.add_argument("--personas", type=Path, default=None, help="folder of persona .toml files (default: <train dir>/personas)")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT", help="'latest' or a checkpoint folder of this run")
    p.add_argument("--overwrite", action="store_true", help="start over in a non-empty --output")
    p.add_argument("--lr", dest="learning_rate", type=float, default=d.learning_rate)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per forward pass")
    p.add_argument("--grad-accumulation", type=int, default=d.grad_accumulation, help="forward passes per optimizer step")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0: off)")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps (replaces --epochs)")
    p.add_argument("--eval-every", type=float, default=d.eval_every, help="<1: fraction of all steps; >=1: steps")
    p.add_argument("--eval-examples", type=int, default=d.eval_examples, help="validation examples generated for BLEU")
    p.add_argument("--eval-max-new-tokens", type=int, default=d.eval_max_new_tokens)
    p.add_argument("--patience", dest="early_stopping_patience", type=int, default=d.early_stopping_patience,
                   help="evaluations without a better model (see --select-by) before stopping (0: never)")
    p.add_argument("--select-by", choices=SELECT_BY, default=d.select_by,
                   help="what makes a model better: eval BLEU (the recipe's) or eval loss (steadier on a small "
                        "validation set)")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision, help="auto: bf16 on a GPU that has it, else fp32")
    p.add_argument("--device", choices=DEVICES, default=d.device)
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens of prompt + reply; older turns dropped first")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--log-every", type=int, default=d.log_every, help="optimizer steps between loss lines")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="npctalk evaluate", description="Score bundles on a test JSONL through the "
                                "engine: BLEU, chrF, Dist-1/2, reply length, reference perplexity.")
    p.add_argument("bundles", nargs="+", type=Path, metavar="BUNDLE", help="bundle folder(s); several give a comparison table")
    p.add_argument("--data", type=Path, required=True, help="test JSONL")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder for <bundle>.json/.md and comparison.md")
    p.add_argument("--personas", type=Path, default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above: sampled with --seed")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0: off (default)")
    p.add_argument("--no-repeat-ngram", type=int, default=0, help="0: off (default)")
    p.add_argument("--chat-defaults", action="store_true",
                   help="decode as `npctalk chat`/`serve` ship (sampled, repetition-controlled), seeded with --seed; "
                        "replaces the decoding flags above")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--with-consistency", action="store_true",
                   help="also run the persona consistency scripts (as `npctalk evaluate --consistency`) and add "
                        "their shares to the report and the comparison table")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _config(args: argparse.Namespace) -> FinetuneConfig:
    """The one place finetune arguments become ``FinetuneConfig``."""
    return FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})


def _run_finetune(args: argparse.Namespace) -> int:
    from .train import finetune

    result = finetune(args.source, args.train, args.valid, args.output, _config(args), resume=args.resume,
                      personas_dir=args.personas, overwrite=args.overwrite, progress=sys.stderr.isatty())
    sys.stdout.write(f"{result.output}\n")
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    importlib.import_module("sacrebleu")  # the scores need it: a missing extra fails now, not after every reply

    from .evaluate import EvalOptions, engine_consistency, evaluate_bundle
    from .report import comparison_table

    options = EvalOptions.shipped(args.seed, args.limit, args.provider) if args.chat_defaults else EvalOptions(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, no_repeat_ngram=args.no_repeat_ngram, seed=args.seed,
        limit=args.limit, provider=args.provider)
    reports = []
    for bundle in args.bundles:
        report = evaluate_bundle(bundle, args.data, options, personas_dir=args.personas,
                                 consistency=engine_consistency() if args.with_consistency else None)
        json_path, _ = report.write(args.output, stem=bundle.resolve().name)
        log.info("%s: BLEU %.2f, chrF %.2f, PPL %.2f → %s", bundle, report.metrics["bleu"], report.metrics["chrf"],
                 report.metrics["perplexity"], json_path)
        reports.append(report)
    table = comparison_table(reports)
    (args.output / "comparison.md").write_text(table, encoding="utf-8")
    sys.stdout.write(table)
    return 0


def main(command: str, argv: Sequence[str]) -> int:
    """Run ``npctalk <command> argv…`` for ``finetune`` or ``evaluate``."""
    parser, run = (finetune_parser(), _run_finetune) if command == "finetune" else (evaluate_parser(), _run_evaluate)
    args = parser.parse_args(list(argv))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours = logging.getLogger("npctalk")
    ours.addHandler(handler)
    ours.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    ours.propagate = False
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read by transformers when first used
        for name in _NOISY:
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return run(args)
    except NpctalkError as exc:
        log.error("error: %s", exc)
        log.debug("details", exc_info=True)
        return 1
    except ImportError as exc:
        extras = "export,finetune" if command == "finetune" else "finetune"
        log.error("error: %s needs the %s extra%s: pip install 'npctalk[%s]' (%s)", command, extras.replace(",", " and "),
                  "s" if "," in extras else "", extras, exc)
        return 1
    except KeyboardInterrupt:
        log.error("error: interrupted%s.", "; resume with --resume latest" if command == "finetune" else "")
        return 130
    finally:
        ours.removeHandler(handler)
