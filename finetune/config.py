"""``FinetuneConfig``: every training setting, with the defaults of the recipe that was tried.

Units: learning rate per optimizer step; ``epochs`` passes over the training file; ``batch_size``
examples per forward pass; ``grad_accumulation`` forward passes per optimizer step (effective batch
``batch_size × grad_accumulation`` = 16); ``max_length`` tokens of prompt + reply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from npctalk.engine.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
SELECT_BY = ("bleu", "loss")


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune. ``eval_every`` < 1 is a fraction of all optimizer steps (0.05 = every 5 %),
    >= 1 a step count (e.g. 500). ``precision`` ``auto`` is bf16 autocast on a GPU that supports it,
    fp32 otherwise; weights are always kept and saved in fp32. ``early_stopping_patience`` 0 disables it.
    ``max_steps`` (optimizer steps), when set, replaces ``epochs``. ``eval_examples`` caps how many
    validation examples are generated for BLEU at each evaluation (None: all)."""

    learning_rate: float = 1e-5
    warmup_ratio: float = 0.1
    schedule: str = "cosine"
    batch_size: int = 2
    grad_accumulation: int = 8
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    epochs: float = 5.0
    max_steps: int | None = None
    eval_every: float = 0.05
    eval_examples: int | None = None
    eval_max_new_tokens: int = 48
    early_stopping_patience: int = 3
    select_by: str = "bleu"
    precision: str = "auto"
    device: str = "auto"
    max_length: int = 512
    seed: int = 0
    keep_checkpoints: int = 1
    log_every: int = 10

    def __post_init__(self) -> None:
        problems = []

        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0 or (value == 0 and not allow_zero):
                problems.append(f"{name} must be a number {'>= 0' if allow_zero else '> 0'}, got {value!r}")

        for name in ("learning_rate", "batch_size", "grad_accumulation", "epochs", "eval_every",
                     "eval_max_new_tokens", "max_length", "keep_checkpoints", "log_every"):
            positive(name)
        for name in ("weight_decay", "max_grad_norm", "early_stopping_patience", "seed"):
            positive(name, allow_zero=True)
        for name in ("batch_size", "grad_accumulation", "eval_max_new_tokens", "max_length", "keep_checkpoints",
                     "log_every", "early_stopping_patience", "seed"):
            if not isinstance(getattr(self, name), int):
                problems.append(f"{name} must be an integer, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.eval_every >= 1 and self.eval_every != int(self.eval_every):
            problems.append(f"eval_every >= 1 is a step count and must be whole, got {self.eval_every!r}")
        for name in ("max_steps", "eval_examples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                problems.append(f"{name} must be a positive integer or None, got {value!r}")
        for name, allowed in (("schedule", SCHEDULES), ("precision", PRECISIONS), ("device", DEVICES),
                              ("select_by", SELECT_BY)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if problems:
            raise ConfigError("Invalid fine-tuning settings: " + "; ".join(problems) + ".")

    def total_steps(self, train_examples: int) -> int:
        """Optimizer steps of the whole run for ``train_examples`` examples."""
        return self.max_steps or max(1, math.ceil(self.epochs * self.steps_per_epoch(train_examples)))

    def steps_per_epoch(self, train_examples: int) -> int:
        return math.ceil(math.ceil(train_examples / self.batch_size) / self.grad_accumulation)

    def eval_interval(self, total_steps: int) -> int:
        """Optimizer steps between evaluations."""
        if self.eval_every >= 1:
            return int(self.eval_every)
        return max(1, math.ceil(self.eval_every * total_steps))

    def to_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
