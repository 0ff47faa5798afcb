"""chat_format.py: templates cut into literal pieces round-trip against apply_chat_template."""

from __future__ import annotations

from pathlib import Path

import pytest
from npctalk.engine.bundle import load_manifest
from npctalk.engine.errors import UnsupportedModelError
from npctalk.export.chat_format import chat_format_from_tokenizer, end_of_turn_ids, render_chat

ZEPHYR_TEMPLATE = (  # TinyLlama-1.1B-Chat-v1.0's template, verbatim
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA2_TEMPLATE = (  # folds the system prompt into the first user turn: not a per-role format
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = '' %}{% endif %}"
    "{% for message in loop_messages %}{% if loop.index0 == 0 %}{% set content = system_message + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content + ' ' + eos_token }}{% endif %}{% endfor %}"
)
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": "You are Bram, the village smith."}, {"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hail, traveller."}, {"role": "user", "content": "Sell me a sword — ¿cuánto? 🗡️"}],
]


@pytest.fixture
def tokenizer(tiny_llama_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _implicit_system(fmt, messages):
    if messages[0]["role"] != "system" and fmt.default_system:
        return [{"role": "system", "content": fmt.default_system}, *messages]
    return messages


@pytest.mark.parametrize("template", ["chatml", "zephyr", "llama3"])
def test_pieces_reproduce_the_template(tokenizer, template: str) -> None:
    if template == "zephyr":
        tokenizer.chat_template = ZEPHYR_TEMPLATE
    elif template == "llama3":
        tokenizer.chat_template = LLAMA3_STYLE_TEMPLATE
    fmt = chat_format_from_tokenizer(tokenizer)
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_chat(fmt, _implicit_system(fmt, messages)) == expected


def test_chatml_pieces(tokenizer) -> None:
    fmt = chat_format_from_tokenizer(tokenizer)
    assert (fmt.user_prefix, fmt.user_suffix) == ("<|im_start|>user\n", "<|im_end|>\n")
    assert (fmt.system_prefix, fmt.assistant_prefix) == ("<|im_start|>system\n", "<|im_start|>assistant\n")
    # <|im_start|> is this tokenizer's bos_token, but it opens every turn: it is not a conversation BOS.
    assert tokenizer.bos_token == "<|im_start|>" and fmt.bos == ""
    assert fmt.default_system == "You are a helpful assistant."


def test_zephyr_pieces(tokenizer) -> None:
    tokenizer.chat_template = ZEPHYR_TEMPLATE
    fmt = chat_format_from_tokenizer(tokenizer)
    eos = tokenizer.eos_token
    assert (fmt.user_prefix, fmt.user_suffix) == ("<|user|>\n", f"{eos}\n")
    assert fmt.assistant_prefix == "<|assistant|>\n" and fmt.default_system is None and fmt.bos == ""


def test_bos_written_once_by_the_template_becomes_chat_format_bos(tokenizer) -> None:
    tokenizer.chat_template = LLAMA3_STYLE_TEMPLATE
    tokenizer.bos_token = "<|endoftext|>"
    fmt = chat_format_from_tokenizer(tokenizer)
    assert fmt.bos == "<|endoftext|>" and fmt.system_prefix.startswith("<|start_header_id|>system")
    # Without a system turn the conversation still opens with the BOS.
    only_user = [{"role": "user", "content": "Hi"}]
    assert render_chat(fmt, only_user) == tokenizer.apply_chat_template(only_user, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("template", [LLAMA2_TEMPLATE, NO_SYSTEM_TEMPLATE])
def test_template_that_cannot_be_cut_is_refused(tokenizer, template: str) -> None:
    tokenizer.chat_template = template
    with pytest.raises(UnsupportedModelError, match="chat template"):
        chat_format_from_tokenizer(tokenizer)


def test_bundle_tokens_match_apply_chat_template(llama_bundle: Path, tiny_llama_dir: Path) -> None:
    """Tokenizing pieces (specials parsed) and texts separately with the bundle's tokenizer.json,
    as the runtime does, gives exactly transformers' chat token ids."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    manifest = load_manifest(llama_bundle)
    tok = Tokenizer.from_file(str(llama_bundle / manifest.tokenizer_file))
    fmt = manifest.chat_format
    assert fmt is not None and manifest.dialogue_format == "chat_template"
    pieces = {"system": (fmt.system_prefix, fmt.system_suffix), "user": (fmt.user_prefix, fmt.user_suffix),
              "assistant": (fmt.assistant_prefix, fmt.assistant_suffix)}
    hf = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for messages in CONVERSATIONS:
        ids = tok.encode(fmt.bos, add_special_tokens=False).ids if fmt.bos else []
        for m in _implicit_system(fmt, messages):
            pre, suf = pieces[m["role"]]
            for text in (pre, m["content"], suf):
                ids += tok.encode(text, add_special_tokens=False).ids
        ids += tok.encode(fmt.assistant_prefix, add_special_tokens=False).ids
        expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        assert ids == list(expected)


def test_end_of_turn_ids_include_config_eos_and_known_turn_tokens(tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    ids = end_of_turn_ids(tokenizer, vocab["<|im_end|>"])
    assert ids[0] == vocab["<|im_end|>"] and vocab["<|endoftext|>"] in ids and len(set(ids)) == len(ids)
    assert vocab["<|im_start|>"] not in ids
