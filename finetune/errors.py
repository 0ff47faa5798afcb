"""Errors of fine-tuning and evaluation; all are ``NpctalkError``s, so ``npctalk`` prints them as one line.

    NpctalkError (npctalk.engine.errors)
    └── FinetuneError           fine-tuning or evaluation could not run
        ├── DatasetError        a JSONL line is malformed (the message names file:line)
        └── MetricInputError    a metric got the wrong shape of input (word lists instead of strings, …)
"""

from __future__ import annotations

from npctalk.engine.errors import NpctalkError


class FinetuneError(NpctalkError):
    """Fine-tuning or evaluation could not run (bad options, missing checkpoint, …)."""


class DatasetError(FinetuneError):
    """A dataset file or one of its lines is malformed; the message starts with ``file:line``."""


class MetricInputError(FinetuneError):
    """A metric was given input of the wrong shape; the message says what was expected."""
