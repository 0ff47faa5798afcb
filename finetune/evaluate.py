"""``evaluate_bundle``: score an exported bundle on a test file through the engine, so what is scored
is what ships. Torch-free (ONNX Runtime via ``npctalk.engine``).

For each example the engine's own prompt (``prompts.ExampleEncoder`` → ``engine.npcs.PromptBuilder``)
goes through ``engine.generator.Generator`` and ``engine.stream.ReplyStream`` — greedy by default, or
sampled with a fixed seed — and the reply is compared with the reference:

* BLEU and chrF (sacrebleu, corpus level, 0-100), Dist-1/Dist-2 and average length in words
  (``metrics``), the references' average length beside it;
* perplexity of the references: exp of the mean negative log-likelihood per reference token (the
  closing end-of-turn token included, as in training), teacher-forced through the bundle's ONNX graph
  one token at a time over its KV cache;
* an optional ``consistency`` scorer (issue 5's persona consistency) whose named scores land in the
  report's "Persona consistency" section.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npctalk.engine.errors import ConfigError
from npctalk.engine.generator import Generator, GeneratorParams
from npctalk.engine.grounding import Grounding
from npctalk.engine.model import Model
from npctalk.engine.slot_model import open_model
from npctalk.engine.sampling import CHAT_DEFAULTS, SearchOptions
from npctalk.engine.steering import FactSteering
from npctalk.engine.stream import ReplyStream

from .dataset import Example, load_examples
from .metrics import average_length, corpus_bleu, corpus_chrf, distinct_n
from .prompts import ExampleEncoder
from .report import EvalReport, Sample

log = logging.getLogger(__name__)

ConsistencyScorer = Callable[[Model], Mapping[str, float]]
SAMPLES_KEPT = 20  # example replies shown in the report


@dataclass(frozen=True)
class EvalOptions:
    """Decoding for evaluation. ``temperature`` 0 is greedy (``seed`` unused); above 0 samples with
    ``top_p``/``top_k`` and the fixed ``seed``. ``repetition_penalty`` 1.0 and ``no_repeat_ngram`` 0
    are off; ``fact_bias`` 0 turns fact steering off; ``EvalOptions.shipped()`` decodes as ``npctalk chat``
    and ``serve`` do, fact steering included. ``limit`` scores
    only the first N examples."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0
    seed: int = 0
    limit: int | None = None
    provider: str = "auto"
    fact_bias: float = 0.0

    def __post_init__(self) -> None:
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ConfigError(f"limit must be a positive integer or None, got {self.limit!r}.")
        self.search_options()  # SearchOptions checks the rest

    @classmethod
    def shipped(cls, seed: int = 0, limit: int | None = None, provider: str = "auto") -> EvalOptions:
        """The engine's chat defaults (``sampling.CHAT_DEFAULTS``: sampled, repetition-controlled), seeded."""
        d = CHAT_DEFAULTS
        return cls(max_new_tokens=d.max_new_tokens, temperature=d.temperature, top_k=d.top_k, top_p=d.top_p,
                   repetition_penalty=d.repetition_penalty, no_repeat_ngram=d.no_repeat_ngram_size, seed=seed,
                   limit=limit, provider=provider, fact_bias=d.fact_bias)

    def search_options(self) -> SearchOptions:
        return SearchOptions(max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0,
                             temperature=self.temperature or 1.0, top_k=self.top_k, top_p=self.top_p,
                             repetition_penalty=self.repetition_penalty, no_repeat_ngram_size=self.no_repeat_ngram,
                             seed=self.seed, fact_bias=self.fact_bias)


def engine_consistency(candidates: int = 4, max_new_tokens: int = 48) -> ConsistencyScorer:
    """Issue 5's persona consistency (``engine.consistency``: scripted conversations, every memory ×
    reranking setting) as a scorer: ``{"memory on, rerank off": share consistent, …}``."""

    def score(model: Model) -> dict[str, float]:
        from npctalk.engine.consistency import evaluate, load_scripts

        report = evaluate(model.path, load_scripts(), candidates=candidates, max_new_tokens=max_new_tokens,
                          provider=model.provider)
        return {f"memory {s['memory']}, rerank {s['rerank']}": float(s["consistent_share"]) for s in report["settings"]}

    return score


def generate_reply(model: Model, encoder: ExampleEncoder, example: Example, options: SearchOptions) -> str:
    """The engine's reply to ``example``'s prompt, as a game would receive it."""
    params = GeneratorParams(model)
    params.set_search_options(options)
    generator = Generator(model, params)
    generator.append_tokens(encoder.prompt_ids(example, options.max_new_tokens))
    if example.persona is not None and options.fact_bias > 0:  # as the server steers a say (engine/steering.py)
        notes = encoder.builder.notes(example.persona, example.history, example.prompt, example.context)
        grounding = Grounding.build(example.persona, example.prompt,
                                    player_lines=[t.text for t in example.history if t.role == "user"],
                                    context=[note for _, note in notes])  # the prompt's context and lore
        generator.set_steering(FactSteering.build(grounding, model.tokenizer, options.fact_bias))
    return ReplyStream(generator, model.tokenizer).read().strip()


def reference_nll(model: Model, encoder: ExampleEncoder, example: Example) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of the reference reply's tokens, and their count."""
    encoded = encoder.encode(example)
    cache = model.new_cache(batch_size=1)
    logits = model.forward(np.asarray([encoded.input_ids[: encoded.prompt_length]]), cache)  # (1, vocab)
    total = 0.0
    target = encoded.target_ids
    for i, token in enumerate(target):
        row = logits[0].astype(np.float64)
        log_z = row.max() + math.log(float(np.exp(row - row.max()).sum()))
        total += log_z - row[token]
        if i + 1 < len(target):
            logits = model.forward(np.asarray([[token]]), cache)
    return total, len(target)


def evaluate_bundle(bundle: str | Path, test_file: str | Path, options: EvalOptions = EvalOptions(), *,
                    personas_dir: str | Path | None = None, consistency: ConsistencyScorer | None = None) -> EvalReport:
    """Generate a reply for every example of ``test_file`` with ``bundle`` and score them."""
    started = time.monotonic()
    examples = load_examples(test_file, personas_dir)[: options.limit]
    model = open_model(bundle, provider=options.provider)  # type: ignore[arg-type]
    encoder = ExampleEncoder(model.manifest, model.tokenizer)
    search = options.search_options()
    predictions, nll, tokens = [], 0.0, 0
    for i, example in enumerate(examples, start=1):
        predictions.append(generate_reply(model, encoder, example, search))
        loss, count = reference_nll(model, encoder, example)
        nll, tokens = nll + loss, tokens + count
        if i % 25 == 0 or i == len(examples):
            log.info("evaluated %d/%d examples (%.0f s)", i, len(examples), time.monotonic() - started)
    references = [[e.completion] for e in examples]
    metrics = {
        "bleu": corpus_bleu(predictions, references),
        "chrf": corpus_chrf(predictions, references),
        "dist1": distinct_n(predictions, 1),
        "dist2": distinct_n(predictions, 2),
        "avg_words": average_length(predictions),
        "reference_avg_words": average_length([e.completion for e in examples]),
        "perplexity": math.exp(nll / tokens),
    }
    scores = dict(consistency(model)) if consistency is not None else None
    samples = tuple(Sample(e.where, e.persona.name if e.persona else "", e.prompt, e.completion, p)
                    for e, p in list(zip(examples, predictions, strict=True))[:SAMPLES_KEPT])
    return EvalReport(
        bundle=str(bundle), model=model.manifest.name, test_file=str(test_file), examples=len(examples),
        decoding={"temperature": options.temperature, "top_k": options.top_k, "top_p": options.top_p,
                  "repetition_penalty": options.repetition_penalty, "no_repeat_ngram": options.no_repeat_ngram,
                  "seed": options.seed, "max_new_tokens": options.max_new_tokens, "fact_bias": options.fact_bias,
                  "provider": model.provider},
        metrics=metrics, consistency=scores, samples=samples, seconds=time.monotonic() - started,
    )
