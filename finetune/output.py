"""The fine-tuning output folder: a Hugging Face model folder that ``export-onnx <folder>`` accepts.

    <output>/
      config.json, model.safetensors, tokenizer files   the best model so far (by eval BLEU)
      README.md        model card: base model, license (front matter, read by export-onnx), results
      LICENSE          the base model's license text (fine-tuned weights keep the base's license)
      finetune.json    RunInfo: base model, settings, every evaluation, best step
      checkpoints/     resumable states (checkpoint.py)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import FinetuneError

log = logging.getLogger(__name__)

RUN_FILE = "finetune.json"


@dataclass(frozen=True)
class BaseModel:
    """What was fine-tuned: display ``name``, bundle ``architecture``, source id, license."""

    name: str
    architecture: str
    source: str
    license_spdx: str
    license_text: str


def load_base(source: str | Path) -> tuple[BaseModel, Any]:
    """Resolve and load ``source`` as export-onnx does (folder, hub id, ``default``); return it and ``Loaded``."""
    from npctalk.export import sources
    from npctalk.export.notices import resolve_license

    src = sources.resolve(source)
    loaded = sources.load_pretrained(src)
    gguf = loaded.extras.get("gguf", {})
    lic = resolve_license(src.name, (*src.hints, str(getattr(loaded.config, "_name_or_path", "")),
                                     str(gguf.get("general.name", ""))), src.folder,
                          src.metadata_license or gguf.get("general.license"))
    base = BaseModel(src.name, loaded.architecture, src.info.id, lic.info.spdx, lic.text)
    return base, loaded


def prepare_output(output: Path, overwrite: bool) -> None:
    """A fresh run needs an empty (or new) folder; a previous run is kept unless ``overwrite``."""
    if output.exists() and not output.is_dir():
        raise FinetuneError(f"{output} is a file; choose a folder for the fine-tuned model.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FinetuneError(
            f"{output} is not empty (an earlier run?). Pass --resume latest to continue it, --overwrite to start "
            "over there, or choose another --output."
        )
    if overwrite and output.is_dir():
        import shutil

        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def write_card(output: Path, base: BaseModel, summary: dict[str, Any] | None = None) -> None:
    """README.md (front matter with the license export-onnx reads) and the base model's LICENSE text."""
    front = ["---", "tags: [npctalk, npc-dialogue]", f"base_model: {base.name}"]
    if base.license_spdx != "unknown":
        front.insert(1, f"license: {base.license_spdx.lower()}")
    lines = [*front, "---", "", f"# {output.name}", "",
             f"{base.name} fine-tuned for NPC dialogue with `npctalk finetune`. Build a bundle with "
             f"`export-onnx {output}`. The weights keep the base model's license ({base.license_spdx}); see LICENSE.", ""]
    if summary:
        lines += ["## Training", "", "```json", json.dumps(summary, indent=2), "```", ""]
    (output / "README.md").write_text("\n".join(lines), encoding="utf-8")
    (output / "LICENSE").write_text(base.license_text, encoding="utf-8")


def write_run_info(output: Path, info: dict[str, Any]) -> None:
    tmp = output / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    tmp.replace(output / RUN_FILE)


def read_run_info(output: Path) -> dict[str, Any]:
    path = output / RUN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FinetuneError(f"{output} holds no {RUN_FILE}: it is not an npctalk fine-tuning run to resume.") from None
    except (OSError, ValueError) as exc:
        raise FinetuneError(f"{path} is unreadable: {exc}.") from exc
    if not isinstance(data, dict) or "base" not in data:
        raise FinetuneError(f"{path} lacks the base model record; it was not written by npctalk finetune.")
    return data
