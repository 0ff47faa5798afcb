"""notices.py: the model's license is recognised, read from its model card, or flagged unknown."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from npctalk.engine.bundle import load_manifest
from npctalk.export.notices import LICENSE_FILE, card_license, resolve_license, to_spdx


@pytest.mark.parametrize("name, spdx, owner", [
    ("microsoft/DialoGPT-small", "MIT", "Microsoft"),
    ("/models/DialoGPT-large", "MIT", "Microsoft"),
    ("openai-community/gpt2", "MIT", "OpenAI"),
    ("gpt2-medium", "MIT", "OpenAI"),
    ("HuggingFaceTB/SmolLM2-360M-Instruct", "Apache-2.0", "Hugging Face"),
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "Apache-2.0", "TinyLlama"),
])
def test_known_models(name: str, spdx: str, owner: str) -> None:
    lic = resolve_license(name, (), None)
    assert lic.info.spdx == spdx and owner in lic.info.attribution and lic.info.file == LICENSE_FILE
    assert owner in lic.text or owner.lower() in lic.text.lower()
    assert ("Permission is hereby granted" in lic.text) == (spdx == "MIT")
    assert ("apache.org/licenses/LICENSE-2.0" in lic.text) == (spdx == "Apache-2.0")


def test_gpt2_lookalikes_are_not_openai_gpt2() -> None:
    assert resolve_license("distilgpt2", (), None).info.spdx == "unknown"
    assert resolve_license("tiny-gpt2", (), None).info.spdx == "unknown"


def test_model_card_front_matter(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("---\nlanguage: en\nlicense: apache-2.0\ntags:\n- chat\n---\n# My model\nlicense: mit\n")
    (tmp_path / "LICENSE").write_text("The full license text of my model.\n")
    lic = resolve_license("my-model", (), tmp_path)
    assert lic.info.spdx == "Apache-2.0" and "model card" in lic.info.attribution
    assert "my-model" in lic.text and "The full license text of my model." in lic.text


def test_model_card_other_license_uses_its_name(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: acme-community\n---\n")
    assert card_license(tmp_path) == "acme-community"
    assert resolve_license("x", (), tmp_path).info.spdx == "LicenseRef-acme-community"


def test_spdx_mapping() -> None:
    assert (to_spdx("mit"), to_spdx("Apache-2.0"), to_spdx("cc-by-nc-4.0")) == ("MIT", "Apache-2.0", "CC-BY-NC-4.0")
    assert to_spdx("llama3.2") == "LicenseRef-llama3.2"


def test_unknown_license_warns_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="npctalk.export.notices"):
        lic = resolve_license("mystery-model", ("/tmp/mystery",), tmp_path)
    assert lic.info.spdx == "unknown"
    assert "NOT DETERMINED" in lic.text and "mystery-model" in lic.text
    assert any("Could not determine the license of mystery-model" in r.getMessage() for r in caplog.records)


def test_metadata_license_is_used_when_there_is_no_card() -> None:
    assert resolve_license("some-gguf", (), None, metadata_license="apache-2.0").info.spdx == "Apache-2.0"


def test_bundle_carries_license_file_and_attribution(bundle: Path) -> None:
    manifest = load_manifest(bundle)
    text = (bundle / manifest.license.file).read_text()
    # The tiny test models have no card and no known name: the honest answer is "unknown".
    assert manifest.license.spdx == "unknown" and "NOT DETERMINED" in text
    assert manifest.license.attribution


def test_bundle_of_a_dialogpt_folder_gets_microsofts_mit_notice(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    import shutil

    from npctalk.export.api import export_bundle

    src = shutil.copytree(tiny_gpt2_dir, tmp_path / "DialoGPT-tiny")
    manifest = load_manifest(export_bundle(src, tmp_path / "out"))
    assert manifest.license.spdx == "MIT" and "Microsoft" in manifest.license.attribution
    assert "Copyright (c) Microsoft Corporation" in (tmp_path / "out" / "LICENSE.model").read_text()
