"""Tiny random-weight GPT-2 (DialoGPT-shaped) and Llama (SmolLM2-shaped) models, built in seconds.

No model hub: the tokenizer is a byte-level BPE trained here on a few lines of text that include
multi-byte characters (accents, CJK, emoji), so streaming detokenization meets split characters.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Hello traveller, welcome to the village of Ashford.",
    "The blacksmith forges swords and horseshoes all day long.",
    "Did you hear? The baker's daughter went missing near the old mill.",
    "Café crème, naïve façade, jalapeño — Ünïcödé wörds for the tokenizer.",
    "東京の鍛冶屋は刀を作ります。 我们村子里有一位老铁匠。",
    "Dragons 🐉 and potions 🧪 and treasure 💰 await the brave 🛡️.",
    "What is your name? My name is Bram, and I keep the forge.",
    "I do not know anything about the king's secret plans.",
] * 4

# ChatML, written out for the tests; the same shape SmolLM2's template produces.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _train_tokenizer(special_tokens: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def build_tiny_gpt2(folder: Path, *, seed: int = 0, vocab_size: int | None = None) -> Path:
    """A 2-layer GPT-2 with DialoGPT's conventions: no chat template, turns joined by EOS.
    ``vocab_size``: logits wider than the tokenizer's ids (as a real model's padded vocabulary)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    raw = _train_tokenizer(["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    tok.save_pretrained(folder)
    eos = raw.token_to_id("<|endoftext|>")
    config = GPT2Config(
        vocab_size=vocab_size or raw.get_vocab_size(), n_positions=1024, n_embd=64, n_layer=2, n_head=4, initializer_range=0.2,
        bos_token_id=eos, eos_token_id=eos,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


def build_tiny_llama(folder: Path, *, seed: int = 0) -> Path:
    """A 2-layer Llama with grouped-query attention and a ChatML template, like SmolLM2."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    raw = _train_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", bos_token="<|im_start|>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=raw.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=raw.token_to_id("<|im_start|>"), eos_token_id=raw.token_to_id("<|im_end|>"),
        pad_token_id=raw.token_to_id("<|im_end|>"), tie_word_embeddings=True, rope_theta=10000.0,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder
