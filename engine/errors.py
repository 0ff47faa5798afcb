"""Every exception npctalk raises on purpose, in one tree.

    NpctalkError
    ├── BundleError            a model bundle is missing, incomplete or malformed
    ├── ExportError            export-onnx could not build a bundle
    │   ├── UnsupportedModelError   the architecture is not one we export
    │   ├── SourceUnavailableError  weights cannot be read (no folder, no network, bad checksum)
    │   └── ValidationError         ONNX logits differ from PyTorch beyond the tolerance
    ├── GenerationError        the generator was driven wrongly (bad token ids, context overflow, …)
    │   └── ContextOverflowError    the prompt plus reply would not fit the model's context
    ├── PromptError            a dialogue could not be formatted (unknown role, empty persona, …)
    ├── ConfigError            a setting is out of range (temperature < 0, top_p > 1, …)
    └── ServeError             the server could not start or was driven wrongly
        ├── RequestStateError       a request was moved between states its state machine forbids (a bug)
        └── StoreError              the memory database cannot be opened, read or written
            └── SaveFormatError         a save.import blob this npctalk did not write (names the bad field)

    (npctalk.finetune adds FinetuneError → DatasetError, MetricInputError under NpctalkError.)

Catch ``NpctalkError`` to catch them all. Each message is a full sentence that says what was wrong
and, where one exists, what to do about it.
"""

from __future__ import annotations


class NpctalkError(Exception):
    """Base of every error npctalk raises on purpose."""


class BundleError(NpctalkError):
    """A model bundle folder is missing, half-written, or its manifest is malformed."""


class ExportError(NpctalkError):
    """export-onnx could not produce a bundle."""


class UnsupportedModelError(ExportError):
    """The source model's architecture is not one npctalk exports."""


class SourceUnavailableError(ExportError):
    """The source weights cannot be read: missing folder, no network, checksum mismatch."""


class ValidationError(ExportError):
    """The exported graph's logits differ from the PyTorch model's beyond the tolerance."""


class GenerationError(NpctalkError):
    """The generator was asked to do something impossible."""


class ContextOverflowError(GenerationError):
    """The tokens would not fit the model's maximum context."""


class PromptError(NpctalkError):
    """A dialogue could not be turned into a prompt."""


class ConfigError(NpctalkError):
    """A configuration value is out of range or of the wrong type."""


class ServeError(NpctalkError):
    """``npctalk serve`` cannot start (address in use, bad bind) or its engine was driven wrongly."""


class RequestStateError(ServeError):
    """A server request was moved between states its state machine forbids; always a bug."""


class StoreError(ServeError):
    """The memory database cannot be opened, read or written."""


class SaveFormatError(StoreError):
    """A save blob that is not one this npctalk wrote: the message names the bad field."""
