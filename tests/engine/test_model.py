"""Model: ONNX Runtime session, feeds, KV cache, context limit; the runtime never imports torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from npctalk.engine.errors import BundleError, ConfigError, ContextOverflowError, GenerationError
from npctalk.engine.generator import Generator, GeneratorParams
from npctalk.engine.kv_cache import KVCache
from npctalk.engine.model import GraphIO, Model

TEXT = "Hello traveller, welcome to the village of Ashford."


def prompt(model: Model) -> np.ndarray:
    return np.array([model.tokenizer.encode(TEXT)], dtype=np.int64)  # (1, seq)


def test_forward_shapes_and_cache(model: Model) -> None:
    m, ids = model.manifest, prompt(model)
    cache = model.new_cache()
    logits = model.forward(ids, cache)
    assert logits.shape == (1, m.vocab_size) and logits.dtype == np.float32
    assert cache.length == ids.shape[1]
    for array in (*cache.keys, *cache.values):
        assert array.shape == (1, m.num_kv_heads, ids.shape[1], m.head_dim) and array.dtype == np.float32
    model.forward(ids[:, :1], cache)
    assert cache.length == ids.shape[1] + 1


def test_cached_generation_equals_uncached(model: Model) -> None:
    """Greedy Generator (KV cache) == rerunning the whole sequence with an empty past each step."""
    ids = prompt(model)[0].tolist()
    params = GeneratorParams(model)
    params.set_search_options(max_new_tokens=32)
    gen = Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    uncached = list(ids)
    while len(uncached) - len(ids) < 32:
        full = model.forward(np.array([uncached]), model.new_cache())  # (1, vocab), no past
        uncached.append(int(full.argmax()))
        if uncached[-1] in model.manifest.eos_token_ids:
            break
    assert gen.tokens == uncached


def test_chunked_prefill_and_rewind_match_a_fresh_prefill(model: Model) -> None:
    ids = prompt(model)
    fresh = model.forward(ids, model.new_cache())
    cache = model.new_cache()
    model.forward(ids[:, :5], cache)
    np.testing.assert_allclose(model.forward(ids[:, 5:], cache), fresh, atol=1e-5)
    # Rewind past a different continuation, then append the real one.
    other = np.array([model.tokenizer.encode(" The blacksmith forges swords")], dtype=np.int64)
    cache = model.new_cache()
    model.forward(np.concatenate([ids[:, :7], other], axis=1), cache)
    cache.rewind(7)
    assert cache.length == 7 and all(k.shape[2] == 7 for k in cache.keys)
    np.testing.assert_allclose(model.forward(ids[:, 7:], cache), fresh, atol=1e-5)


def test_context_overflow_raises_before_running(model: Model) -> None:
    limit = model.manifest.max_context
    cache = model.new_cache()
    model.forward(np.full((1, limit - 2), 5, dtype=np.int64), cache)
    with pytest.raises(ContextOverflowError, match=f"context of {limit} tokens"):
        model.forward(np.full((1, 3), 5, dtype=np.int64), cache)
    assert cache.length == limit - 2  # untouched
    model.forward(np.full((1, 2), 5, dtype=np.int64), cache)  # exactly full is fine
    with pytest.raises(ContextOverflowError):
        model.forward(np.full((1, 1), 5, dtype=np.int64), cache)


def test_bad_inputs_are_generation_errors(gpt2_model: Model) -> None:
    with pytest.raises(GenerationError, match="Token ids"):
        gpt2_model.forward(np.array([[gpt2_model.manifest.vocab_size]]), gpt2_model.new_cache())
    with pytest.raises(GenerationError, match="input_ids must be"):
        gpt2_model.forward(np.array([1, 2]), gpt2_model.new_cache())
    with pytest.raises(GenerationError, match="Cannot rewind"):
        gpt2_model.new_cache().rewind(1)


def test_providers(gpt2_bundle: Path) -> None:
    auto = Model(gpt2_bundle, provider="auto", intra_op_threads=1)
    assert auto.provider in ("cpu", "cuda")
    assert (auto.provider == "cuda") == ("CUDAExecutionProvider" in auto.session.get_providers())
    try:
        assert Model(gpt2_bundle, provider="cuda").provider == "cuda"
    except ConfigError as exc:
        assert "cuda" in str(exc).lower()
        assert auto.provider == "cpu"
    with pytest.raises(ConfigError, match="provider"):
        Model(gpt2_bundle, provider="tpu")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="intra_op_threads"):
        Model(gpt2_bundle, provider="cpu", intra_op_threads=0)


def test_spinning_can_be_turned_off_without_changing_a_logit(gpt2_bundle: Path) -> None:
    """Spinning is a session setting only: the same logits either way, and the session really has it."""
    ids = np.array([[3, 14, 15, 92, 65]])
    logits = []
    for spin in (True, False):
        model = Model(gpt2_bundle, provider="cpu", intra_op_threads=2, spin=spin)
        entry = model.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        assert entry == ("1" if spin else "0")
        logits.append(model.forward(ids, model.new_cache(1)))
    np.testing.assert_array_equal(logits[0], logits[1])


def test_missing_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        Model(tmp_path / "nothing")


def _stub_session(inputs: dict[str, str], outputs: list[str]) -> SimpleNamespace:
    return SimpleNamespace(
        get_inputs=lambda: [SimpleNamespace(name=n, type=t) for n, t in inputs.items()],
        get_outputs=lambda: [SimpleNamespace(name=n) for n in outputs],
    )


def test_graph_io_feeds_only_declared_inputs(gpt2_model: Model) -> None:
    """A graph without attention_mask/position_ids (older GPT-2 exports) gets neither."""
    m = gpt2_model.manifest
    real = {i.name: i.type for i in gpt2_model.session.get_inputs()}
    outputs = [o.name for o in gpt2_model.session.get_outputs()]
    lean = {k: v for k, v in real.items() if k not in ("attention_mask", "position_ids")}
    io = GraphIO.resolve(m, _stub_session(lean, outputs))
    assert io.attention_mask is None and io.position_ids is None
    # Manifest entries may be None while the graph declares the input: fed under the default name.
    m_none = dataclasses.replace(m, io={**m.io, "attention_mask": None, "position_ids": None})
    assert GraphIO.resolve(m_none, _stub_session(real, outputs)).attention_mask == "attention_mask"
    with pytest.raises(BundleError, match="cannot feed"):
        GraphIO.resolve(m, _stub_session({**real, "token_type_ids": "tensor(int64)"}, outputs))
    with pytest.raises(BundleError, match="lacks"):
        GraphIO.resolve(m, _stub_session(real, outputs[:-1]))
    with pytest.raises(BundleError, match="kv_dtype"):
        GraphIO.resolve(dataclasses.replace(m, kv_dtype="fp16"), _stub_session(real, outputs))

    # Run through a session that rejects the two inputs, filling them in for the real graph.
    fed: list[set[str]] = []
    session = gpt2_model.session

    def run(names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        fed.append(set(feed))
        assert "attention_mask" not in feed and "position_ids" not in feed
        batch, seq = feed["input_ids"].shape
        past = feed["past_key_values.0.key"].shape[2]
        full = {**feed, "attention_mask": np.ones((batch, past + seq), np.int64),
                "position_ids": np.arange(past, past + seq, dtype=np.int64)[None]}
        return session.run(names, full)

    lean_model = object.__new__(Model)
    # In-place KV needs both inputs (the mask sets GroupQueryAttention's lengths): the plain path here.
    lean_model.__dict__.update(gpt2_model.__dict__, io=io, session=SimpleNamespace(run=run), inplace_kv=False)
    ids = prompt(gpt2_model)
    np.testing.assert_allclose(lean_model.forward(ids, lean_model.new_cache()),
                               gpt2_model.forward(ids, gpt2_model.new_cache()), atol=1e-6)
    assert fed and all("input_ids" in f for f in fed)


def test_fp16_cache_dtype() -> None:
    cache = KVCache(num_layers=3, batch_size=2, kv_heads=4, head_dim=8, dtype=np.float16)
    assert cache.length == 0 and cache.batch_size == 2 and cache.num_layers == 3
    assert cache.keys[0].shape == (2, 4, 0, 8) and cache.keys[0].dtype == np.float16


def test_runtime_never_imports_torch_or_transformers() -> None:
    code = (
        "import sys\n"
        "import npctalk.engine.model, npctalk.engine.generator, npctalk.engine.stream, npctalk.engine.sampling\n"
        "import npctalk.engine.tokenizer, npctalk.engine.detokenizer, npctalk.engine.kv_cache\n"
        "bad = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
