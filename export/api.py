"""``export_bundle``: the one Python entry point behind ``export-onnx``.

Stages (each logged as ``[n/N] stage``): resolve source → load PyTorch model → convert to ONNX →
optimize (fp16 / int8) → validate against PyTorch → write tokenizer, notices, manifest → publish.
Everything is built in ``<output>.partial-<pid>`` and renamed into place at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from npctalk.engine.bundle import LicenseInfo, Manifest, SourceInfo, load_manifest, write_manifest
from npctalk.engine.errors import BundleError, ExportError, UnsupportedModelError

from .chat_format import chat_format_from_tokenizer, end_of_turn_ids
from .convert import convert_to_onnx

log = logging.getLogger(__name__)

SUPPORTED = {"gpt2": "gpt2", "llama": "llama"}


@dataclass(frozen=True)
class ExportOptions:
    """What to build. ``atol`` None means the dtype's default tolerance (see validate.py)."""

    dtype: str = "fp32"
    device: str = "cpu"
    atol: float | None = None
    force: bool = False


def export_bundle(source: str | Path, output: str | Path, options: ExportOptions = ExportOptions()) -> Path:
    """Build a model bundle from ``source`` (folder, hub id) into ``output``; return ``output``."""
    output = Path(output)
    if output.exists() and not options.force:
        try:
            load_manifest(output)
        except BundleError:
            raise ExportError(f"{output} exists and is not a complete bundle; remove it or pass --force.") from None
        log.info("Bundle already exists at %s (pass --force to rebuild).", output)
        return output
    partial = output.with_name(f"{output.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _build(str(source), partial, options, SourceInfo(kind="folder" if Path(source).exists() else "hub", id=str(source)))
        if output.exists():
            shutil.rmtree(output)
        partial.rename(output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("Bundle ready: %s", output)
    return output


def _build(source: str, folder: Path, options: ExportOptions, source_info: SourceInfo) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    arch = SUPPORTED.get(config.model_type)
    if arch is None:
        raise UnsupportedModelError(
            f"{source} is a {config.model_type!r} model; npctalk exports GPT-2 (DialoGPT) and Llama-family models."
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, torch_dtype="float32").eval()
    convert_to_onnx(model, folder, device=options.device)
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    chat = chat_format_from_tokenizer(tokenizer) if tokenizer.chat_template else None
    (folder / "LICENSE.model").write_text("(license text)\n", encoding="utf-8")
    (folder / "validation.json").write_text("{}\n", encoding="utf-8")
    heads = config.num_attention_heads
    manifest = Manifest(
        name=Path(source).name,
        architecture=arch,
        dialogue_format="chat_template" if chat else "eos_joined",
        num_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        max_context=getattr(config, "max_position_embeddings", None) or config.n_positions,
        eos_token_ids=end_of_turn_ids(tokenizer, config.eos_token_id) if chat else (int(config.eos_token_id),),
        pad_token_id=int(config.pad_token_id if config.pad_token_id is not None else config.eos_token_id),
        bos_token_id=config.bos_token_id,
        dtype=options.dtype,
        kv_dtype="fp16" if options.dtype == "fp16" else "fp32",
        device=options.device,
        source=source_info,
        license=LicenseInfo(spdx="unknown", file="LICENSE.model", attribution=""),
        chat_format=chat,
    )
    write_manifest(folder, manifest)
