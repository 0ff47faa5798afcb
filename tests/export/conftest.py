"""Export-test helpers: unsupported model folders, a CLI runner, extra tiny bundles (int8, fp16)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Call ``export-onnx``'s ``main`` in-process; return its exit code and captured stdout/stderr."""
    from npctalk.export.cli import main

    def run(*argv: str) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with only a BERT config: an encoder npctalk must refuse before loading weights."""
    from transformers import BertConfig

    folder = tmp_path_factory.mktemp("hf") / "tiny-bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with only a T5 config: an encoder-decoder npctalk must refuse."""
    from transformers import T5Config

    folder = tmp_path_factory.mktemp("hf") / "tiny-t5"
    T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2).save_pretrained(folder)
    return folder


def _export(source: Path, out: Path, dtype: str, **options: str) -> Path:
    from npctalk.export.api import ExportOptions, export_bundle

    logging.getLogger("npctalk").setLevel(logging.INFO)
    return export_bundle(source, out, ExportOptions(dtype=dtype, **options))


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def int8_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """int8 (dynamic quantization) bundle of each tiny model."""
    source = request.getfixturevalue(f"tiny_{request.param}_dir")
    return _export(source, tmp_path_factory.mktemp("bundles") / f"{request.param}-int8", "int8")


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def int4_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """int4 (4-bit weight-only) bundle of each tiny model."""
    source = request.getfixturevalue(f"tiny_{request.param}_dir")
    return _export(source, tmp_path_factory.mktemp("bundles") / f"{request.param}-int4", "int4")


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def fp16_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp16 bundle of each tiny model, validated on the CPU."""
    source = request.getfixturevalue(f"tiny_{request.param}_dir")
    return _export(source, tmp_path_factory.mktemp("bundles") / f"{request.param}-fp16", "fp16")


@pytest.fixture(scope="session")
def optimum_gpt2_bundle(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 through optimum's graph (Gemm layers, every position's logits)."""
    return _export(tiny_gpt2_dir, tmp_path_factory.mktemp("bundles") / "gpt2-optimum", "fp32", graph="optimum")


@pytest.fixture(scope="session")
def optimum_llama_bundle(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama through optimum's graph (tied LM head read through a Transpose)."""
    return _export(tiny_llama_dir, tmp_path_factory.mktemp("bundles") / "llama-optimum", "fp32", graph="optimum")
