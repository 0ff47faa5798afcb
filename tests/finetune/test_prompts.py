"""Training prompts are the engine's prompts, and the loss covers the NPC's reply only."""

from __future__ import annotations

from pathlib import Path

import pytest

from npctalk.engine.dialogue import Turn
from npctalk.engine.model import Model
from npctalk.engine.npcs import PromptBuilder
from npctalk.engine.persona import find_persona
from npctalk.finetune.dataset import Example
from npctalk.finetune.errors import DatasetError
from npctalk.finetune.prompts import IGNORE_INDEX, ExampleEncoder, engine_tokenizer, training_manifest

pytest.importorskip("torch")

EXAMPLES = [
    Example("Got any iron?", "Not a scrap, friend.", find_persona("bram")),
    Example("Whose footprints?", "Small ones, traveller.", find_persona("tobin"),
            (Turn("user", "Caught the sneak?"), Turn("assistant", "Not yet.")), {"location": "the north gate"}),
]


def _hf_encoder(folder: Path, max_length: int = 1024) -> tuple[ExampleEncoder, object]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config, tok = AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    arch = "gpt2" if config.model_type == "gpt2" else "llama"
    encoder = ExampleEncoder(training_manifest(config, tok, folder.name, arch, max_length), engine_tokenizer(tok))
    return encoder, AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_prompt_is_exactly_what_the_engine_feeds(family: str, request: pytest.FixtureRequest) -> None:
    folder, bundle = request.getfixturevalue(f"tiny_{family}_dir"), request.getfixturevalue(f"{family}_bundle")
    encoder, _ = _hf_encoder(folder)
    model = Model(bundle, provider="cpu")
    engine = PromptBuilder(model.manifest, model.tokenizer)
    for example in EXAMPLES:
        assert example.persona is not None
        expected = engine.build(example.persona, example.history, example.prompt, example.context, 32)
        assert encoder.prompt_ids(example, 32) == expected
        assert ExampleEncoder(model.manifest, model.tokenizer).encode(example) == encoder.encode(example)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_labels_mask_the_prompt_and_keep_the_reply_and_its_end(family: str, request: pytest.FixtureRequest) -> None:
    encoder, _ = _hf_encoder(request.getfixturevalue(f"tiny_{family}_dir"))
    encoded = encoder.encode(EXAMPLES[1])
    n = encoded.prompt_length
    assert n == len(encoder.prompt_ids(EXAMPLES[1], len(encoded.target_ids))) > 0
    assert encoded.labels[:n] == (IGNORE_INDEX,) * n
    assert encoded.labels[n:] == encoded.input_ids[n:] and IGNORE_INDEX not in encoded.labels[n:]
    tokenizer, eos = encoder.formatter.tokenizer, encoder.manifest.eos_token_ids
    assert tokenizer.decode(list(encoded.target_ids)).strip() == "Small ones, traveller."
    assert any(t in eos for t in encoded.target_ids[-2:])  # the model learns to stop where the engine stops


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loss_counts_reply_tokens_only(family: str, request: pytest.FixtureRequest) -> None:
    import torch
    import torch.nn.functional as F

    from npctalk.finetune.train import completion_loss_sum

    encoder, model = _hf_encoder(request.getfixturevalue(f"tiny_{family}_dir"))
    batch = [encoder.encode(e) for e in EXAMPLES]
    loss, count = completion_loss_sum(model.eval(), batch, "cpu", None)
    assert count == sum(len(e.target_ids) for e in batch)
    manual = 0.0
    with torch.no_grad():
        for e in batch:  # unpadded, one at a time: only positions predicting reply tokens count
            logits = model(torch.tensor([e.input_ids])).logits[0]
            n = e.prompt_length
            manual += float(F.cross_entropy(logits[n - 1:-1], torch.tensor(e.target_ids), reduction="sum"))
    assert float(loss.detach()) == pytest.approx(manual, rel=1e-4)


def test_example_too_long_for_the_context_names_its_line(tiny_llama_dir: Path) -> None:
    encoder, _ = _hf_encoder(tiny_llama_dir, max_length=64)
    with pytest.raises(DatasetError, match=r"^train.jsonl:7: .*context holds 64"):
        encoder.encode(Example("Hello?", "Hi.", find_persona("bram"), where="train.jsonl:7"))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_example_without_persona(family: str, request: pytest.FixtureRequest) -> None:
    """DialoGPT: just the turns; a chat model: the system prompt its template injects by default."""
    encoder, _ = _hf_encoder(request.getfixturevalue(f"tiny_{family}_dir"))
    ids = encoder.prompt_ids(Example("Hello?", "Hi."), 8)
    text = encoder.formatter.tokenizer.decode(ids, skip_special_tokens=False)
    if family == "gpt2":
        assert text == "Hello?<|endoftext|>"
    else:
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
        assert text.endswith("<|im_start|>user\nHello?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(DatasetError, match="'context' needs a 'persona'"):
        encoder.encode(Example("Hello?", "Hi.", context={"location": "the forge"}, where="t.jsonl:3"))
