"""Examples → token ids, built exactly as the engine prompts a bundle of the same model. Torch-free.

The prompt comes from ``engine.npcs.PromptBuilder`` (which uses ``engine.dialogue.DialogueFormatter``
and ``engine.persona.Persona``): the persona as system prompt (chat templates) or leading turns
(DialoGPT), the game context, the history, the player's line, the generation prompt. The target is
the NPC's reply closed the way the engine closes an assistant turn (``DialogueFormatter.turn_ids``):
text + EOS for DialoGPT, text + the template's assistant suffix (``<|im_end|>``…) for chat models, so
the model learns to stop where the engine stops. Loss is on the target only: prompt labels are -100.

During training there is no bundle yet; ``training_manifest`` describes the Hugging Face model the way
``export-onnx`` will (same chat-template cut, same EOS ids, same ``tokenizer.json``), so the ids match.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npctalk.engine.bundle import LicenseInfo, Manifest, SourceInfo
from npctalk.engine.dialogue import DialogueFormatter, Turn
from npctalk.engine.errors import PromptError
from npctalk.engine.npcs import PromptBuilder
from npctalk.engine.tokenizer import Tokenizer

from .dataset import Example
from .errors import DatasetError

IGNORE_INDEX = -100  # label of a position that carries no loss (PyTorch cross_entropy's ignore_index)


@dataclass(frozen=True)
class Encoded:
    """One example as ids: ``input_ids`` = prompt + target; ``labels`` = -100 × prompt + target."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt_length: int

    @property
    def target_ids(self) -> tuple[int, ...]:
        return self.input_ids[self.prompt_length:]


class ExampleEncoder:
    """Encodes examples for one model. ``manifest.max_context`` caps prompt + target (older turns are
    dropped first, as the engine does). Stateless and thread-safe."""

    def __init__(self, manifest: Manifest, tokenizer: Tokenizer) -> None:
        self.manifest = manifest
        self.formatter = DialogueFormatter(manifest, tokenizer)
        self.builder = PromptBuilder(manifest, tokenizer)

    def target_ids(self, completion: str) -> list[int]:
        """The NPC's reply as the engine writes a finished assistant turn, minus the generation prompt."""
        opening = self.formatter.generation_prompt_ids()
        turn = self.formatter.turn_ids(Turn("assistant", completion))
        if turn[: len(opening)] != opening:  # the generation prompt is the assistant prefix; a bug otherwise
            raise PromptError("The assistant turn does not start with the generation prompt; cannot align the target.")
        return turn[len(opening):]

    def prompt_ids(self, example: Example, reply_tokens: int) -> list[int]:
        """What the engine feeds before the reply, leaving ``reply_tokens`` of room in the context."""
        try:
            if example.persona is not None:
                return self.builder.build(example.persona, example.history, example.prompt, example.context, reply_tokens)
            if example.context:
                raise DatasetError(f"{example.where}: 'context' needs a 'persona' "
                                   "(the engine puts it beside the persona).")
            chat = self.manifest.chat_format
            system = (chat.default_system or "") if chat else ""
            if chat and not system:
                raise DatasetError(f"{example.where}: this chat model needs a 'persona' "
                                   "(its template has no default system prompt).")
            ids = self.formatter.prompt_ids(system, [*example.history, Turn("user", example.prompt)])
            if len(ids) + reply_tokens > self.manifest.max_context:
                raise PromptError(f"prompt and reply take {len(ids) + reply_tokens} tokens; "
                                  f"the model's context holds {self.manifest.max_context}.")
            return ids
        except PromptError as exc:
            raise DatasetError(f"{example.where}: {exc}") from None

    def encode(self, example: Example) -> Encoded:
        """Prompt + target ids with labels; ``DatasetError`` naming the line when it cannot fit."""
        target = self.target_ids(example.completion)
        prompt = self.prompt_ids(example, len(target))
        return Encoded(tuple(prompt + target), (IGNORE_INDEX,) * len(prompt) + tuple(target), len(prompt))


def engine_tokenizer(hf_tokenizer: Any) -> Tokenizer:
    """The engine's ``Tokenizer`` for a transformers fast tokenizer, via the same ``tokenizer.json``
    export-onnx writes into a bundle."""
    from npctalk.export.tokenizer_file import write_tokenizer_json

    with tempfile.TemporaryDirectory(prefix="npctalk-tok-") as tmp:
        return Tokenizer.from_file(write_tokenizer_json(hf_tokenizer, Path(tmp)))


def training_manifest(config: Any, hf_tokenizer: Any, name: str, architecture: str, max_length: int) -> Manifest:
    """A manifest describing the Hugging Face model as export-onnx will, for prompt formatting only.

    ``max_context`` is ``min(model context, max_length)``: longer examples lose their oldest turns.
    """
    from npctalk.export.chat_format import chat_format_from_tokenizer, end_of_turn_ids

    chat = chat_format_from_tokenizer(hf_tokenizer) if getattr(hf_tokenizer, "chat_template", None) else None
    config_eos = config.eos_token_id
    eos = end_of_turn_ids(hf_tokenizer, config_eos) if chat else tuple(
        int(i) for i in (config_eos if isinstance(config_eos, list) else [config_eos]))
    pad = next(int(p) for p in (config.pad_token_id, hf_tokenizer.pad_token_id, eos[0]) if p is not None)
    heads = config.num_attention_heads
    context = getattr(config, "max_position_embeddings", None) or config.n_positions
    return Manifest(
        name=name, architecture=architecture, dialogue_format="chat_template" if chat else "eos_joined",
        num_layers=config.num_hidden_layers, num_attention_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        hidden_size=config.hidden_size, vocab_size=config.vocab_size, max_context=min(context, max_length),
        eos_token_ids=eos, pad_token_id=pad, bos_token_id=config.bos_token_id, dtype="fp32", kv_dtype="fp32",
        device="cpu", source=SourceInfo("folder", name), license=LicenseInfo("unknown", "LICENSE.model", name),
        chat_format=chat,
    )
