"""api.py: the bundle a tiny export writes, and the options/caching rules of export_bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from npctalk.engine import paths
from npctalk.engine.bundle import Manifest, load_manifest
from npctalk.engine.errors import ConfigError
from npctalk.export.api import ExportOptions, auto_dtype, default_output, export_bundle


def test_bundle_has_the_contract_files_and_a_loadable_manifest(bundle: Path) -> None:
    names = {p.name for p in bundle.iterdir()}
    assert names == {"manifest.json", "model.onnx", "tokenizer.json", "validation.json", "LICENSE.model"}
    manifest = load_manifest(bundle)
    assert isinstance(manifest, Manifest) and manifest.format_version == 1
    config = json.loads((Path(manifest.source.id) / "config.json").read_text())
    assert manifest.max_context == config.get("n_positions", config.get("max_position_embeddings"))
    assert (manifest.num_layers, manifest.hidden_size) == (2, 64)
    assert manifest.head_dim * manifest.num_attention_heads == manifest.hidden_size
    assert manifest.source.kind == "folder" and Path(manifest.source.id).is_absolute()
    assert manifest.npctalk_version and manifest.dtype == "fp32" and manifest.device == "cpu"


def test_family_specific_manifest_fields(gpt2_bundle: Path, llama_bundle: Path, tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    gpt2 = load_manifest(gpt2_bundle)
    assert gpt2.architecture == "gpt2" and gpt2.dialogue_format == "eos_joined" and gpt2.chat_format is None
    assert gpt2.num_kv_heads == gpt2.num_attention_heads == 4 and len(gpt2.eos_token_ids) == 1
    llama = load_manifest(llama_bundle)
    vocab = AutoTokenizer.from_pretrained(tiny_llama_dir).get_vocab()
    assert llama.architecture == "llama" and llama.dialogue_format == "chat_template"
    assert (llama.num_attention_heads, llama.num_kv_heads) == (4, 2)
    assert llama.eos_token_ids[0] == vocab["<|im_end|>"] and llama.pad_token_id == vocab["<|im_end|>"]


def test_tokenizer_json_never_adds_special_tokens(bundle: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    text = "Hello traveller, welcome to Ashford. Café 東京 🐉"
    assert tok.encode(text, add_special_tokens=True).ids == tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text).ids) == text


def test_strips_a_bos_adding_post_processor(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Llama tokenizers prepend BOS on every encode; the bundle's tokenizer.json must not."""
    from npctalk.export.tokenizer_file import write_tokenizer_json
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_llama_dir)
    bos = hf.convert_tokens_to_ids("<|im_start|>")
    hf.backend_tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]),
    ])
    assert hf("Hi")["input_ids"][0] == bos
    tok = Tokenizer.from_file(str(write_tokenizer_json(hf, tmp_path)))
    assert bos not in tok.encode("Hi", add_special_tokens=True).ids
    assert json.loads((tmp_path / "tokenizer.json").read_text())["post_processor"]["type"] == "Sequence"


def test_default_output_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NPCTALK_HOME", str(tmp_path))
    assert default_output("default") == paths.default_bundle_path()
    assert default_output("default", "int8") == paths.bundles_dir() / "smollm2-135m-instruct-int8"
    assert default_output("microsoft/DialoGPT-small") == paths.bundles_dir() / "dialogpt-small"
    assert default_output(tmp_path / "My Model", "fp16") == paths.bundles_dir() / "my-model-fp16"
    # No suffix for the source's own (auto) precision: int4 for the GGUF default, fp32 for the rest.
    assert default_output("default", "int4") == paths.default_bundle_path()
    assert default_output("default", "fp32") == paths.bundles_dir() / "smollm2-135m-instruct-fp32"
    assert default_output("microsoft/DialoGPT-small", "fp32") == paths.bundles_dir() / "dialogpt-small"
    assert default_output("microsoft/DialoGPT-small", "fp16", "cuda") == paths.bundles_dir() / "dialogpt-small-cuda"
    assert default_output("default", "fp16", "cuda") == paths.bundles_dir() / "smollm2-135m-instruct-cuda"


def test_auto_dtype_is_the_precision_the_source_ships_in(tmp_path: Path) -> None:
    assert auto_dtype("default") == "int4" and auto_dtype("default", "cuda") == "fp16"
    assert auto_dtype(tmp_path) == "fp32" and auto_dtype("microsoft/DialoGPT-medium") == "fp32"
    assert ExportOptions().dtype == "auto"


def test_auto_dtype_export_of_a_folder_is_fp32(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    out = export_bundle(tiny_gpt2_dir, tmp_path / "auto", ExportOptions())
    assert load_manifest(out).dtype == "fp32"


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "int3"}, "dtype must be one of auto, fp32, fp16, int8"),
    ({"device": "tpu"}, "device must be one of cpu, cuda"),
    ({"atol": -0.1}, "atol must be a number >= 0"),
    ({"atol": float("nan")}, "atol must be a number >= 0"),
    ({"graph": "fast"}, "graph must be one of optimum, lean"),
])
def test_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ExportOptions(**kwargs)


def test_force_replaces_a_complete_bundle(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    out = export_bundle(tiny_gpt2_dir, tmp_path / "b")
    first = (out / "manifest.json").stat().st_mtime_ns
    assert export_bundle(tiny_gpt2_dir, out) == out and (out / "manifest.json").stat().st_mtime_ns == first
    export_bundle(tiny_gpt2_dir, out, ExportOptions(dtype="int8", force=True))
    assert load_manifest(out).dtype == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_explicit_atol_is_recorded(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    out = export_bundle(tiny_gpt2_dir, tmp_path / "b", ExportOptions(atol=0.5))
    report = json.loads((out / "validation.json").read_text())
    assert report["tolerance"] == {"atol": 0.5, "rtol": 0.0, "explicit_atol": True}
    assert all(s["logits_limit"] == 0.5 for s in report["steps"])


def test_a_bundle_of_the_other_graph_builder_is_not_reused(gpt2_bundle: Path) -> None:
    from npctalk.engine.errors import ExportError

    manifest = load_manifest(gpt2_bundle)
    other = "lean" if manifest.graph == "optimum" else "optimum"
    with pytest.raises(ExportError, match=f"{manifest.graph} graph, mask layout\\), not .*{other} graph, mask layout\\); pass --force"):
        export_bundle(manifest.source.id, gpt2_bundle, ExportOptions(graph=other))


def test_the_default_cache_rebuilds_a_bundle_built_with_other_options(tiny_gpt2_dir: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached bundle from an older graph builder is stale, not the user's folder: no --force needed there."""
    monkeypatch.setenv("NPCTALK_HOME", str(tmp_path / "home"))
    out = export_bundle(tiny_gpt2_dir, options=ExportOptions(graph="optimum"))
    assert out == default_output(tiny_gpt2_dir) and load_manifest(out).graph == "optimum"
    assert export_bundle(tiny_gpt2_dir, options=ExportOptions(graph="lean")) == out
    assert load_manifest(out).graph == "lean"
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no partial or old folder left
    from npctalk.engine.errors import ExportError

    with pytest.raises(ExportError, match="pass --force"):  # a folder the user named is never replaced unasked
        export_bundle(tiny_gpt2_dir, out, ExportOptions(graph="optimum"))
