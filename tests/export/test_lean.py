"""export/lean: npctalk's own decoder graph for both families, fp32 and fp16 (and int8 from it).

Each bundle is exported through ``export_bundle(graph="lean")``, so the export's own validation
(prefill + 8 decode steps + left padding vs PyTorch) has already passed; these tests check what the
report says, then run the graph through the engine and against transformers directly.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from npctalk.engine.batch import DecodeBatch
from npctalk.engine.bundle import load_manifest
from npctalk.engine.errors import UnsupportedModelError
from npctalk.engine.generator import Generator, GeneratorParams
from npctalk.engine.model import Model
from npctalk.export.validate import DECODE_STEPS

# Nodes of one layer (see export/lean/gpt2.py and llama.py) and the graph-wide ones (mask → bias, head).
MAX_NODES_PER_LAYER = {"gpt2": 9, "llama": 14}
MAX_SHARED_NODES = 21  # GPT-2: 13 for mask and lengths, 2 embeddings, final norm, slice, 3 for the head (+ a Cast in fp16)


def _export(source: Path | str, out: Path, dtype: str) -> Path:
    from npctalk.export.api import ExportOptions, export_bundle

    logging.getLogger("npctalk").setLevel(logging.INFO)
    return export_bundle(source, out, ExportOptions(dtype=dtype, graph="lean"))


@pytest.fixture(scope="session", params=[("gpt2", "fp32"), ("llama", "fp32"), ("gpt2", "fp16"), ("llama", "fp16")],
                ids=lambda p: "-".join(p))
def lean(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    """(family, dtype, bundle) of each tiny model as a lean graph."""
    family, dtype = request.param
    source = request.getfixturevalue(f"tiny_{family}_dir")
    return family, dtype, _export(source, tmp_path_factory.mktemp("lean") / f"{family}-{dtype}", dtype)


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def lean_int8(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    source = request.getfixturevalue(f"tiny_{request.param}_dir")
    return request.param, _export(source, tmp_path_factory.mktemp("lean") / f"{request.param}-int8", "int8")


def _hf(request: pytest.FixtureRequest, family: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(request.getfixturevalue(f"tiny_{family}_dir"), dtype="float32").eval()


def _graph(bundle: Path):
    import onnx

    return onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph


def test_manifest_names_the_builder_and_the_contract_io(lean: tuple[str, str, Path]) -> None:
    family, dtype, bundle = lean
    manifest = load_manifest(bundle)
    assert manifest.graph == "lean" and manifest.dtype == dtype
    assert manifest.kv_dtype == dtype and manifest.architecture == family
    assert manifest.io["attention_mask"] == "attention_mask" and manifest.io["position_ids"] == "position_ids"


def test_validation_passed_on_the_last_position_logits(lean: tuple[str, str, Path]) -> None:
    _, dtype, bundle = lean
    report = json.loads((bundle / "validation.json").read_text())
    assert report["passed"] is True and report["logits_compared"] == "last position"
    assert [s["step"] for s in report["steps"]] == ["prefill"] + [f"decode {i}" for i in range(1, DECODE_STEPS + 1)]
    assert all(s["logits_max_abs_diff"] <= s["logits_limit"] for s in report["steps"])
    padding = report["left_padding"]
    assert padding["supported"] and padding["pad_tokens"] >= 1
    if dtype == "fp32":  # exact up to kernel order, far below the limit (fp16 may flip a near-tie argmax)
        assert report["top1_agreement"] == 1.0
        assert max(s["logits_max_abs_diff"] for s in report["steps"]) < 1e-4
        assert max(s["present_max_abs_diff"] for s in report["steps"]) < 1e-4
        assert padding["max_abs_diff"] < 1e-4 and padding["present_max_abs_diff"] < 1e-4


def test_parity_with_pytorch_through_the_engine(request: pytest.FixtureRequest, lean: tuple[str, str, Path]) -> None:
    """Model.forward (the runtime's path) on a prompt, then on a continuation over the cache."""
    import torch

    family, dtype, bundle = lean
    hf, model = _hf(request, family), Model(bundle, provider="cpu")
    ids = [int(t) for t in np.random.default_rng(1).integers(3, model.manifest.vocab_size, 12)]
    cache = model.new_cache()
    first = model.forward(np.asarray([ids[:9]]), cache)                # (1, vocab)
    second = model.forward(np.asarray([ids[9:]]), cache)                # three tokens after a cached past
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()                  # (seq, vocab)
    limit = 1e-4 if dtype == "fp32" else 3e-2 * max(1.0, float(np.abs(ref).max()))
    assert np.abs(first[0] - ref[8]).max() < limit
    assert np.abs(second[0] - ref[11]).max() < limit
    assert cache.length == 12 and cache.keys[0].dtype == (np.float32 if dtype == "fp32" else np.float16)


def test_greedy_generation_equals_transformers_generate(request: pytest.FixtureRequest,
                                                        lean: tuple[str, str, Path]) -> None:
    import torch

    family, dtype, bundle = lean
    if dtype == "fp16":
        pytest.skip("fp16 rounding may flip a near-tie argmax on random weights; parity is checked above")
    hf, model = _hf(request, family), Model(bundle, provider="cpu")
    prompt = model.tokenizer.encode("What is your name, blacksmith?") + [model.manifest.eos_token_ids[0]]
    eos = list(model.manifest.eos_token_ids)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               do_sample=False, max_new_tokens=40, eos_token_id=eos,
                               pad_token_id=model.manifest.pad_token_id)[0].tolist()
    params = GeneratorParams(model)
    params.set_search_options(max_new_tokens=40)
    gen = Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    assert gen.tokens == expected and len(expected) > len(prompt)


def test_left_padded_batch_equals_each_stream_alone(lean: tuple[str, str, Path]) -> None:
    """The scheduler's DecodeBatch: rows of different lengths, left-padded, one forward per step."""
    _, dtype, bundle = lean
    model = Model(bundle, provider="cpu")
    rng = np.random.default_rng(2)
    prompts = [[int(t) for t in rng.integers(3, model.manifest.vocab_size, n)] for n in (3, 11, 7)]
    singles, joiners = [], []
    for i, prompt in enumerate(prompts):
        alone, joined = model.new_cache(), model.new_cache()
        singles.append((alone, model.forward(np.asarray([prompt]), alone)))
        model.forward(np.asarray([prompt]), joined)
        joiners.append((i, joined))
    batch: DecodeBatch[int] = DecodeBatch(model)
    batch.add(joiners)
    tokens = [int(logits.argmax()) for _, logits in singles]
    tol = 1e-5 if dtype == "fp32" else 2e-2
    for _ in range(4):
        batched = batch.forward(tokens)                                   # (3, vocab)
        for row, (cache, _) in enumerate(singles):
            alone = model.forward(np.asarray([[tokens[row]]]), cache)
            scale = max(1.0, float(np.abs(alone).max()))
            assert np.abs(batched[row] - alone[0]).max() <= tol * scale, f"row {row} differs"
        tokens = [int(t) for t in batched.argmax(axis=1)]
    assert batch.cache.mask.sum(axis=1).tolist() == [len(p) + 4 for p in prompts]


def test_nodes_per_layer_are_bounded(lean: tuple[str, str, Path]) -> None:
    family, _, bundle = lean
    graph, layers = _graph(bundle), load_manifest(bundle).num_layers
    per_layer = Counter(n.name.split("/")[2] for n in graph.node if n.name.startswith(("/model/layers.", "/transformer/h.")))
    assert len(per_layer) == layers
    assert max(per_layer.values()) <= MAX_NODES_PER_LAYER[family], per_layer
    assert len(graph.node) - sum(per_layer.values()) <= MAX_SHARED_NODES
    ops = Counter(n.op_type for n in graph.node)
    assert ops["GroupQueryAttention"] == layers
    assert ops["RotaryEmbedding"] == (2 * layers if family == "llama" else 0)


def test_file_holds_each_parameter_once(request: pytest.FixtureRequest, lean: tuple[str, str, Path]) -> None:
    """Tied LM head: the embedding is stored once and read by both the Gather and the Gemm."""
    family, dtype, bundle = lean
    hf = _hf(request, family)
    width = 4 if dtype == "fp32" else 2
    params = sum(p.numel() for p in hf.parameters())                      # parameters() yields a tied one once
    manifest = load_manifest(bundle)
    tables = 2 * manifest.max_context * manifest.head_dim // 2 if family == "llama" else 0  # rotary cos + sin
    size = (bundle / "model.onnx").stat().st_size
    expected = (params + tables) * width
    assert expected <= size <= expected * 1.02 + 64_000, (size, expected)
    graph = _graph(bundle)
    vocab_sized = [i.name for i in graph.initializer if manifest.vocab_size in i.dims]
    assert len(vocab_sized) == 1, vocab_sized
    readers = [n.op_type for n in graph.node if vocab_sized[0] in n.input]
    assert sorted(readers) == ["Gather", "Gemm"]


def test_onnxruntime_keeps_one_copy_of_the_embedding(lean: tuple[str, str, Path], tmp_path: Path) -> None:
    """ORT's optimized graph (what it runs) still has one vocab-sized weight: no transposed copy.

    fp32 only: the CPU provider has few fp16 kernels, so ONNX Runtime runs an fp16 graph on the CPU
    through fp32 copies of its weights (inserted Casts, constant-folded); fp16 is meant for CUDA.
    """
    import onnx
    import onnxruntime as ort

    _, dtype, bundle = lean
    if dtype != "fp32":
        pytest.skip("the CPU provider runs fp16 weights through fp32 copies; fp16 is meant for CUDA")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph
    vocab = load_manifest(bundle).vocab_size
    assert len([i for i in optimized.initializer if vocab in i.dims]) == 1


def test_int8_quantizes_the_lean_graph_and_validates(lean_int8: tuple[str, Path]) -> None:
    family, bundle = lean_int8
    report = json.loads((bundle / "validation.json").read_text())
    assert report["passed"] is True and report["dtype"] == "int8" and report["logits_compared"] == "last position"
    assert report["top1_agreement"] >= 0.5
    ops = Counter(n.op_type for n in _graph(bundle).node)
    quantized = ops["MatMulInteger"] + ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"]
    layers = load_manifest(bundle).num_layers
    assert quantized >= 3 * layers + 1, ops                                # every linear layer but the down projection, + LM head
    assert ops["GroupQueryAttention"] == layers and load_manifest(bundle).graph == "lean"


def _variant(name: str):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "gpt2-exact-gelu":
        return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, activation_function="gelu"))
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=name == "llama-untied-lm-head",
        attention_bias=True, mlp_bias=True, initializer_range=0.2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}))


@pytest.mark.parametrize("name, untie", [("gpt2-exact-gelu", False), ("llama3-rope-biases-untied", False),
                                         ("llama-untied-lm-head", True)])
def test_variants_match_pytorch(name: str, untie: bool, tmp_path: Path) -> None:
    """Exact GELU (BiasGelu), q/k/v and MLP biases, llama3 rope scaling, a separate LM head, and a
    tied head written as its own MatMul (the form the quantizers get): all exact in fp32."""
    from npctalk.engine.bundle import DEFAULT_IO
    from npctalk.export.lean import build_lean_graph
    from npctalk.export.validate import OnnxDecoder, check_left_padding, check_parity, tolerance_for

    model = _variant(name).eval()
    path = build_lean_graph(model, "gpt2" if name.startswith("gpt2") else "llama", tmp_path, untie_lm_head=untie)
    graph = _graph(tmp_path)
    assert any(n.op_type == ("MatMul" if untie or "untied" in name else "Gemm") and n.name.startswith("/lm_head/")
               for n in graph.node)
    decoder = OnnxDecoder(path, dict(DEFAULT_IO), model.config.num_hidden_layers)
    ids = [int(t) for t in np.random.default_rng(3).integers(0, 300, 40)]   # past llama3's original 32 positions
    steps = check_parity(decoder, model, ids, tolerance_for("fp32"))
    assert max(s["logits_max_abs_diff"] for s in steps) < 1e-4 and max(s["present_max_abs_diff"] for s in steps) < 1e-4
    padding = check_left_padding(decoder, ids, 0, tolerance_for("fp32"))
    assert padding["max_abs_diff"] < 1e-4 and padding["present_max_abs_diff"] < 1e-4


def test_unsupported_variants_are_refused_by_name(tiny_gpt2_dir: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    from npctalk.export.lean import build_lean_graph
    from transformers import AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, activation_function="relu")
    with pytest.raises(UnsupportedModelError, match="activation_function 'relu'.*--graph optimum"):
        build_lean_graph(gpt2, "gpt2", tmp_path)
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="rope_scaling type 'dynamic'"):
        build_lean_graph(llama, "llama", tmp_path)
    with pytest.raises(UnsupportedModelError, match="no builder for 'mistral'"):
        build_lean_graph(llama, "mistral", tmp_path)
    assert not (tmp_path / "model.onnx").exists()


@pytest.fixture(scope="session")
def lean_llama(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fp32 lean bundle of the tiny Llama, for the checks that need one graph only."""
    return _export(tiny_llama_dir, tmp_path_factory.mktemp("lean") / "llama-fp32", "fp32")


def test_validation_catches_a_corrupted_lean_layer(lean_llama: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Noise in layer 1's fused q|k|v weight: the logits and that layer's cache fail, layer 0's does not."""
    import onnx
    from npctalk.engine.errors import ValidationError
    from npctalk.export.validate import PROMPT, OnnxDecoder, validate
    from onnx import numpy_helper
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bundle = lean_llama
    manifest = load_manifest(bundle)
    model = onnx.load(str(bundle / "model.onnx"))
    init = next(i for i in model.graph.initializer if i.name == "model.layers.1.self_attn.qkv_proj.weight")
    weight = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(weight + np.random.default_rng(0).normal(0, 0.05, weight.shape).astype(weight.dtype),
                                          init.name))
    onnx.save(model, str(tmp_path / "bad.onnx"))
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype="float32").eval()
    ids = AutoTokenizer.from_pretrained(tiny_llama_dir)(PROMPT, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValidationError) as info:
        validate(OnnxDecoder(tmp_path / "bad.onnx", manifest.io, manifest.num_layers), hf, ids, manifest.pad_token_id, "fp32")
    message = str(info.value)
    assert "'logits' differs from PyTorch at prefill" in message and "'present.1." in message
    assert "present.0" not in message


def test_left_padding_check_catches_a_lean_graph_fed_no_mask(lean_llama: Path) -> None:
    """With last-position logits, the padded rows' presents are compared too: both catch a dropped mask."""
    from npctalk.export.validate import TOLERANCES, OnnxDecoder, check_left_padding

    bundle = lean_llama
    manifest = load_manifest(bundle)
    decoder = OnnxDecoder(bundle / "model.onnx", manifest.io, manifest.num_layers)
    assert decoder.last_only
    ids = list(range(5, 25))
    ok = check_left_padding(decoder, ids, manifest.pad_token_id, TOLERANCES["fp32"])
    assert ok["max_abs_diff"] <= ok["limit"] and ok["present_max_abs_diff"] <= ok["present_limit"]
    original = decoder.step
    decoder.step = lambda ids_, mask, pos, past: original(ids_, np.ones_like(mask), pos, past)  # type: ignore[method-assign]
    broken = check_left_padding(decoder, ids, manifest.pad_token_id, TOLERANCES["fp32"])
    assert broken["max_abs_diff"] > broken["limit"] and broken["present_max_abs_diff"] > broken["present_limit"]


@pytest.mark.slow
def test_default_model_lean_export_validates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``export-onnx default --graph lean``: SmolLM2-135M-Instruct within the fp32 tolerance, padding exact."""
    monkeypatch.setenv("NPCTALK_HOME", str(tmp_path))
    bundle = _export("default", tmp_path / "smollm2-lean", "fp32")
    manifest = load_manifest(bundle)
    assert manifest.graph == "lean" and manifest.num_layers == 30 and manifest.num_kv_heads == 3
    report = json.loads((bundle / "validation.json").read_text())
    assert report["passed"] and report["top1_agreement"] == 1.0
    assert all(s["logits_max_abs_diff"] <= s["logits_limit"] for s in report["steps"])
    assert report["left_padding"]["max_abs_diff"] <= report["left_padding"]["limit"]
    nodes = len(_graph(bundle).node)
    assert nodes <= MAX_NODES_PER_LAYER["llama"] * 30 + MAX_SHARED_NODES


def test_manifest_graph_field_defaults_to_optimum_and_is_checked(lean_llama: Path) -> None:
    """Bundles written before the field existed were optimum's; an unknown builder is refused by name."""
    from npctalk.engine.bundle import Manifest
    from npctalk.engine.errors import BundleError

    data = json.loads((lean_llama / "manifest.json").read_text())
    assert data["graph"] == "lean"
    del data["graph"]
    assert Manifest.from_dict(data).graph == "optimum"
    with pytest.raises(BundleError, match="graph 'fast' is not one of"):
        Manifest.from_dict({**data, "graph": "fast"})


def test_batched_multi_token_step_after_a_past_is_refused(lean_llama: Path) -> None:
    """GroupQueryAttention's documented limit (export/lean/graph.py): batch > 1 with seq > 1 after a
    past is an error, never a wrong answer. The engine never makes that call (batched steps feed one
    token per row); if ONNX Runtime lifts the limit this test says so."""
    for inplace in (True, False):  # through IOBinding ONNX Runtime words the error differently
        model = Model(lean_llama, provider="cpu", inplace_kv=inplace)
        cache = model.new_cache(batch_size=2)
        model.forward(np.asarray([[5, 6, 7], [8, 9, 10]]), cache)            # prefill: no past, fine
        with pytest.raises(Exception, match="batch_size must be 1"):
            model.forward(np.asarray([[11, 12], [13, 14]]), cache)
        assert cache.length == 3                                             # the failed step added nothing
    single = model.new_cache()
    model.forward(np.asarray([[5, 6, 7]]), single)
    assert model.forward(np.asarray([[11, 12]]), single).shape == (1, model.manifest.vocab_size)
