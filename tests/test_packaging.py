"""Packaging: the namespace layout, and a runtime that never drags torch into a game."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "optimum", "accelerate", "gguf", "onnx")  # onnx: the export extra, not a game's
# What a game's environment gets from `pip install npctalk` (pyproject's dependencies, by import name),
# and optional extras a runtime module may import when present (guarded by ImportError).
RUNTIME = {"onnxruntime", "numpy", "tokenizers", "zmq", "msgpack"}
OPTIONAL = {"threadpoolctl"}
FOLDERS = {"engine": "engine", "export": "export", "client": "bindings/python", "finetune": "finetune", "demo": "demo_game"}

_PROBE = """
import importlib, json, pkgutil, sys
import npctalk.engine, npctalk.client
names = []
for pkg in (npctalk.engine, npctalk.client):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(info.name)
        names.append(info.name)
print(json.dumps({"imported": names, "modules": sorted(sys.modules)}))
"""


def test_runtime_import_graph_is_torch_free(tmp_path: Path) -> None:
    """Import every runtime module in a fresh interpreter; none may pull a build-time package."""
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=tmp_path, capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert "npctalk.engine.generator" in report["imported"], "walk found no runtime modules"
    heavy = sorted(m for m in report["modules"] if m.split(".")[0] in HEAVY)
    assert heavy == [], f"runtime imports build-time packages: {heavy[:10]}"
    top = {m.split(".")[0] for m in report["modules"]} - set(sys.stdlib_module_names) - {"npctalk", "__main__"}
    third_party = {m for m in top if not m.startswith(("_", "cython")) and "editable" not in m}
    assert third_party <= RUNTIME | OPTIONAL, f"runtime imports undeclared packages: {sorted(third_party - RUNTIME - OPTIONAL)}"


def test_no_generic_top_level_modules(tmp_path: Path) -> None:
    """A game's environment gets ``npctalk.*`` only, never top-level ``engine`` or ``export``."""
    code = "import importlib.util as u, json; print(json.dumps([u.find_spec(n) is None for n in ('engine', 'export', 'bindings')]))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [True, True, True]


@pytest.mark.slow
def test_wheel_maps_folders_into_npctalk_namespace(tmp_path: Path) -> None:
    """A normal (non-editable) build puts the folders under npctalk/ and ships the notices."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    wheel = next(tmp_path.glob("npctalk-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.startswith("npctalk-")}
    assert top == {"npctalk"}, top
    for expected in ("npctalk/engine/generator.py", "npctalk/export/api.py", "npctalk/client/__init__.py",
                     "npctalk/engine/personas/bram.toml", "npctalk/engine/py.typed", "npctalk/client/py.typed"):
        assert expected in names
    assert any(n.endswith("LICENSE-NOTICES") for n in names)
    # Every module and data file of each folder ships, subpackages too (export/lean once did not:
    # an installed export-onnx failed; nor did the wren card: `npctalk personas` lacked it).
    missing = []
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*")):
            relative = path.relative_to(ROOT / folder)
            if path.is_file() and (path.suffix == ".py" or relative.parts[0] in ("personas", "notices")) \
                    and "__pycache__" not in relative.parts:
                if f"npctalk/{package}/{relative.as_posix()}" not in names:
                    missing.append(f"{folder}/{relative.as_posix()}")
    assert missing == [], f"not in the wheel: {missing}"
