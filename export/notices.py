"""The model's license: SPDX id, attribution line and the text written to the bundle's LICENSE.model.

Decided in this order:

1. a model npctalk knows, recognised by name (hub id, folder name, config or GGUF name):
   DialoGPT → MIT (Microsoft), GPT-2 → MIT (OpenAI), SmolLM2 → Apache-2.0 (Hugging Face),
   TinyLlama → Apache-2.0; the text is one of ``notices/*.txt`` (package data);
2. otherwise the ``license`` field of the model card's YAML front matter (``README.md`` in the
   source folder) or of GGUF metadata (``general.license``), plus the folder's own LICENSE file;
3. otherwise ``unknown``: a warning, and a LICENSE.model saying the license was not determined.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from npctalk.engine.bundle import LicenseInfo

log = logging.getLogger(__name__)

LICENSE_FILE = "LICENSE.model"


@dataclass(frozen=True)
class KnownModel:
    """A model family whose license npctalk ships: ``pattern`` is matched against name hints."""

    pattern: re.Pattern[str]
    spdx: str
    notice: str
    attribution: str


KNOWN_MODELS = (
    KnownModel(re.compile(r"dialogpt", re.I), "MIT", "mit-dialogpt.txt",
               "DialoGPT, Copyright (c) Microsoft Corporation, MIT License."),
    KnownModel(re.compile(r"smollm2", re.I), "Apache-2.0", "apache-2.0-smollm2.txt",
               "SmolLM2, Copyright Hugging Face, Apache License 2.0; converted to ONNX by npctalk."),
    KnownModel(re.compile(r"tinyllama", re.I), "Apache-2.0", "apache-2.0-tinyllama.txt",
               "TinyLlama, Copyright the TinyLlama project authors, Apache License 2.0; converted to ONNX by npctalk."),
    KnownModel(re.compile(r"^(openai-community/)?gpt2(-medium|-large|-xl)?$", re.I), "MIT", "mit-gpt2.txt",
               "GPT-2, Copyright (c) 2019 OpenAI, Modified MIT License."),
)

# Hub license ids (lower case) → SPDX ids; anything else becomes ``LicenseRef-<id>``.
_SPDX = {
    "mit": "MIT", "apache-2.0": "Apache-2.0", "bsd-2-clause": "BSD-2-Clause", "bsd-3-clause": "BSD-3-Clause",
    "cc0-1.0": "CC0-1.0", "cc-by-4.0": "CC-BY-4.0", "cc-by-sa-4.0": "CC-BY-SA-4.0", "cc-by-nc-4.0": "CC-BY-NC-4.0",
    "cc-by-nc-sa-4.0": "CC-BY-NC-SA-4.0", "gpl-3.0": "GPL-3.0-only", "lgpl-3.0": "LGPL-3.0-only",
    "agpl-3.0": "AGPL-3.0-only", "mpl-2.0": "MPL-2.0", "openrail": "LicenseRef-openrail", "unlicense": "Unlicense",
}
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)
_OWN_LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE")


@dataclass(frozen=True)
class ModelLicense:
    """What goes into the manifest (``info``) and into LICENSE.model (``text``)."""

    info: LicenseInfo
    text: str


def _notice(name: str) -> str:
    return resources.files("npctalk.export").joinpath("notices", name).read_text(encoding="utf-8")


def _known(hints: Iterable[str]) -> KnownModel | None:
    for hint in hints:
        for candidate in (hint, hint.rstrip("/").rsplit("/", 1)[-1]):
            for known in KNOWN_MODELS:
                if known.pattern.search(candidate):
                    return known
    return None


def card_license(folder: Path) -> str | None:
    """The ``license`` (or ``license_name`` when it is ``other``) from ``folder/README.md`` front matter."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    match = _FRONT_MATTER.match(readme.read_text(encoding="utf-8", errors="replace"))
    if not match:
        return None
    values = dict(re.findall(r"^(license(?:_name)?):\s*['\"]?([^'\"\n#]+?)['\"]?\s*$", match.group(1), re.M))
    value = values.get("license")
    if value == "other" and values.get("license_name"):
        value = values["license_name"]
    return value.strip() if value else None


def to_spdx(license_id: str) -> str:
    """Map a hub/GGUF license id to SPDX (``apache-2.0`` → ``Apache-2.0``); unknown ids → ``LicenseRef-…``."""
    key = license_id.strip().lower()
    if key in _SPDX:
        return _SPDX[key]
    return "LicenseRef-" + re.sub(r"[^A-Za-z0-9.-]+", "-", license_id.strip()).strip("-")


def resolve_license(name: str, hints: Iterable[str], folder: Path | None, metadata_license: str | None = None) -> ModelLicense:
    """Decide the license of model ``name``; ``hints`` are names to match, ``folder`` the source folder.

    ``metadata_license`` is a license id found in the weights file itself (GGUF ``general.license``).
    """
    hints = [h for h in (name, *hints) if h]
    known = _known(hints)
    if known is not None:
        return ModelLicense(LicenseInfo(known.spdx, LICENSE_FILE, known.attribution), _notice(known.notice))
    declared = (card_license(folder) if folder else None) or metadata_license
    if declared:
        spdx = to_spdx(declared)
        text = _notice("model-card.txt").format(name=name, license=f"{spdx} (declared as {declared!r})")
        own = next((folder / f for f in _OWN_LICENSE_FILES if folder and (folder / f).is_file()), None)
        if own is not None:
            text += f"\n---- {own.name} shipped with the model ----\n\n" + own.read_text(encoding="utf-8", errors="replace")
        return ModelLicense(LicenseInfo(spdx, LICENSE_FILE, f"{name}, license {spdx} as declared by its model card."), text)
    log.warning(
        "Could not determine the license of %s (not a model npctalk knows, and no model card with a license). "
        "The bundle's %s says so; find the license before you redistribute the bundle.", name, LICENSE_FILE,
    )
    return ModelLicense(
        LicenseInfo("unknown", LICENSE_FILE, f"{name}, license not determined."),
        _notice("unknown.txt").format(name=name),
    )
