"""The bundle's ``tokenizer.json``: the Hugging Face fast tokenizer, made self-contained and predictable.

Two adjustments, both so that the runtime's ``tokenizers`` library gives the ids transformers would:

- ``encode`` never adds special tokens on its own: a ``TemplateProcessing`` post-processor (which
  prepends BOS to every call, e.g. Llama tokenizers) is removed. transformers' chat path tokenizes
  the rendered template with ``add_special_tokens=False`` too; a BOS the template writes itself is
  kept in ``ChatFormat.bos``.
- A tokenizer rebuilt from GGUF metadata by transformers is corrected against that metadata
  (``fix_gguf_tokenizer``): BOS/EOS tokens, ``add_bos_token``, and the SmolLM pre-tokenizer that
  splits digits one by one, which transformers' GGUF loader drops.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


def _strip_template(processor: dict[str, Any] | None) -> dict[str, Any] | None:
    if processor is None or processor.get("type") == "TemplateProcessing":
        return None
    if processor.get("type") == "Sequence":
        kept = [p for p in processor.get("processors", []) if p.get("type") != "TemplateProcessing"]
        return {**processor, "processors": kept} if kept else None
    return processor


def write_tokenizer_json(tokenizer: Any, folder: Path) -> Path:
    """Write ``folder/tokenizer.json`` from a transformers fast tokenizer; return its path."""
    if not getattr(tokenizer, "is_fast", False):
        from npctalk.engine.errors import UnsupportedModelError

        raise UnsupportedModelError(
            f"The model's tokenizer ({type(tokenizer).__name__}) has no fast (tokenizers) version; "
            "the runtime needs a tokenizer.json."
        )
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    data["post_processor"] = _strip_template(data.get("post_processor"))
    path = folder / TOKENIZER_FILE
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def _gguf_fields(gguf_path: Path) -> dict[str, Any]:
    """Scalar metadata of a GGUF file (strings decoded, 1-element arrays unwrapped)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(gguf_path)
    out: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if not fld.types or fld.types[0] == GGUFValueType.ARRAY or not fld.data:
            continue
        value = fld.parts[fld.data[0]]
        out[key] = bytes(value).decode("utf-8", "replace") if fld.types[0] == GGUFValueType.STRING else value.tolist()[0]
    return out


def fix_gguf_tokenizer(tokenizer: Any, gguf_path: Path) -> dict[str, Any]:
    """Correct a tokenizer transformers built from GGUF metadata, in place; return the metadata used.

    transformers 4.57 turns SmolLM2's GGUF into a LlamaTokenizerFast that prepends ``<|im_start|>``
    to every encode (GGUF says ``add_bos_token = false``), names ``<|im_start|>`` as EOS (GGUF: id 2,
    ``<|im_end|>``) and loses the digit splitting of the ``smollm`` pre-tokenizer.
    """
    from tokenizers import decoders, pre_tokenizers

    meta = _gguf_fields(gguf_path)
    backend = tokenizer.backend_tokenizer
    for role in ("bos", "eos", "pad"):
        token_id = meta.get(f"tokenizer.ggml.{role}_token_id")
        token = backend.id_to_token(token_id) if token_id is not None else None
        if token is not None and getattr(tokenizer, f"{role}_token") != token:
            log.info("GGUF tokenizer: %s token is %r (id %d), not %r", role, token, token_id,
                     getattr(tokenizer, f"{role}_token"))
            setattr(tokenizer, f"{role}_token", token)
    if "tokenizer.ggml.add_bos_token" in meta and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = bool(meta["tokenizer.ggml.add_bos_token"])
    if meta.get("tokenizer.ggml.model") == "gpt2":
        backend.decoder = decoders.ByteLevel()
        if meta.get("tokenizer.ggml.pre") == "smollm":
            # llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM: each digit alone, then GPT-2's byte-level split.
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ])
        elif meta.get("tokenizer.ggml.pre") not in (None, "gpt-2", "default"):
            log.warning("GGUF pre-tokenizer %r is not reproduced exactly; tokenization may differ slightly "
                        "from the original model's.", meta.get("tokenizer.ggml.pre"))
    return meta
