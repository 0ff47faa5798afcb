"""ReplyStream and StopMatcher: streamed text == final text, no half characters, no leaked stop strings."""

from __future__ import annotations

import pytest
from fake_model import ScriptedModel

from npctalk.engine.detokenizer import REPLACEMENT
from npctalk.engine.generator import Generator, GeneratorParams
from npctalk.engine.model import Model
from npctalk.engine.stop import StopMatcher
from npctalk.engine.stream import ReplyStream, stream_reply
from npctalk.engine.tokenizer import Tokenizer

PROMPT = "What is your name?"


def scripted_stream(tok: Tokenizer, reply: str, *, eos: bool = True, **options: object) -> tuple[ReplyStream, list[str], Generator]:
    """Stream a scripted model whose reply is ``reply`` (then EOS when ``eos``)."""
    eos_id = tok.token_to_id("<|im_end|>")
    prompt = tok.encode(PROMPT)
    model = ScriptedModel(tok, prompt + tok.encode(reply) + ([eos_id] if eos else []), eos=eos_id)
    params = GeneratorParams(model)
    params.set_search_options(**options)
    gen = Generator(model, params)
    gen.append_tokens(prompt)
    stream = ReplyStream(gen)
    return stream, list(stream), gen


# --- StopMatcher --------------------------------------------------------------------------------------


def test_stop_matcher_holds_back_possible_starts() -> None:
    m = StopMatcher(["\nPlayer:"])
    assert m.push("Hello") == "Hello"
    assert m.push(" there\nPl") == " there"  # "\nPl" might begin the stop string
    assert m.push("ayer: hi") == "" and m.stopped and m.matched == "\nPlayer:"
    assert m.push("more") == "" and m.flush() == ""


def test_stop_matcher_releases_false_alarms_and_picks_the_earliest() -> None:
    m = StopMatcher(["abc"])
    assert m.push("xab") == "x"
    assert m.push("d") == "abd"
    assert m.push("ab") == "" and m.flush() == "ab" and not m.stopped
    m = StopMatcher(["late", "ear"])
    assert m.push("so early, too late") == "so " and m.matched == "ear"
    assert StopMatcher([]).push("anything") == "anything"


def test_stop_matcher_holds_back_exactly_the_longest_possible_start() -> None:
    """Random chunks over a small alphabet against the plain definition: what is released never
    contains a stop string, and the held text is the longest suffix that begins one."""
    import random

    rng = random.Random(3)
    stops = ["\nab", "ba:", "<|x|>", "a"]
    for _ in range(300):
        kept = rng.sample(stops, rng.randint(1, 3))
        m, text, released = StopMatcher(kept), "", ""
        for _ in range(rng.randint(1, 8)):
            chunk = "".join(rng.choice("ab:\n<|x> ") for _ in range(rng.randint(0, 5)))
            text += chunk
            released += m.push(chunk)
            if m.stopped:
                break
            held = text[len(released):]
            want = max((k for k in range(1, len(text) + 1) if any(s.startswith(text[-k:]) for s in kept)), default=0)
            assert len(held) == want and not any(s in released for s in kept)
        if m.stopped:
            cut = min(text.find(s) for s in kept if s in text)
            assert released == text[:cut]


# --- ReplyStream on a scripted model --------------------------------------------------------------------


@pytest.mark.parametrize("reply", ["東京の鍛冶屋は刀を作ります。", "Dragons 🐉 and potions 🧪!", "Café crème, naïve façade"])
def test_multibyte_stream_equals_final_decode(byte_tokenizer: Tokenizer, reply: str) -> None:
    stream, chunks, gen = scripted_stream(byte_tokenizer, reply)
    assert "".join(chunks) == stream.text == reply
    assert not any(REPLACEMENT in c for c in chunks) and all(chunks)
    assert stream.finish_reason == "stop" and stream.stop_string is None
    assert stream.completion_tokens == len(byte_tokenizer.encode(reply)) + 1  # + EOS, never shown as text
    assert stream.prompt_tokens == len(byte_tokenizer.encode(PROMPT))
    assert len(chunks) < stream.completion_tokens - 1  # split characters were held back, then joined


def test_stop_string_spanning_tokens_never_leaks(byte_tokenizer: Tokenizer) -> None:
    reply, stop = "My name is Bram, and I keep the forge.", "and I keep"
    ids = byte_tokenizer.encode(reply)
    pieces = [byte_tokenizer.decode([i]) for i in ids]
    assert not any(stop in p for p in pieces)  # the stop string spans several tokens
    stream, chunks, gen = scripted_stream(byte_tokenizer, reply, stop_strings=[stop, "never"])
    assert "".join(chunks) == stream.text == "My name is Bram, "
    assert stream.finish_reason == "stop" == gen.finish_reason and stream.stop_string == stop
    assert not any(piece in "".join(chunks) for piece in ("and", "keep", "forge"))
    # The generator stopped on the token that completed the stop string, not at EOS.
    assert byte_tokenizer.decode(gen.reply_tokens).startswith("My name is Bram, and I keep")
    assert "forge" not in byte_tokenizer.decode(gen.reply_tokens)


def test_multibyte_stop_string(byte_tokenizer: Tokenizer) -> None:
    stream, chunks, _ = scripted_stream(byte_tokenizer, "Treasure 💰 await the brave 🛡️.", stop_strings=["💰"])
    assert stream.text == "Treasure " and stream.finish_reason == "stop"


def test_held_text_is_released_when_no_stop_follows(byte_tokenizer: Tokenizer) -> None:
    stream, chunks, _ = scripted_stream(byte_tokenizer, "welcome to the village", stop_strings=["village of Ashford"])
    assert "".join(chunks) == stream.text == "welcome to the village"
    assert stream.finish_reason == "stop" and stream.stop_string is None  # ended by EOS


def test_max_new_tokens_ends_with_length(byte_tokenizer: Tokenizer) -> None:
    reply = "I do not know anything about the king's secret plans."
    stream, chunks, gen = scripted_stream(byte_tokenizer, reply, eos=False, max_new_tokens=5)
    assert stream.finish_reason == "length" and stream.completion_tokens == 5
    assert stream.text == byte_tokenizer.decode(byte_tokenizer.encode(reply)[:5])


def test_stream_reply_helper(byte_tokenizer: Tokenizer) -> None:
    eos_id = byte_tokenizer.token_to_id("<|im_end|>")
    model = ScriptedModel(byte_tokenizer, [5, 6] + byte_tokenizer.encode("Hi 🐉") + [eos_id], eos=eos_id)
    gen = Generator(model, GeneratorParams(model))
    gen.append_tokens([5, 6])
    assert "".join(stream_reply(gen)) == "Hi 🐉"


# --- real tiny models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_equals_decode_on_real_models(model: Model, seed: int) -> None:
    params = GeneratorParams(model)
    params.set_search_options(do_sample=True, temperature=1.0, top_k=0, max_new_tokens=40, seed=seed)
    gen = Generator(model, params)
    gen.append_tokens(model.tokenizer.encode("Hello traveller 東京 🐉"))
    stream = ReplyStream(gen)
    chunks = list(stream)
    reply = [t for t in gen.reply_tokens if t not in model.manifest.eos_token_ids]
    # A random model emits invalid UTF-8 too: dropped, never shown as U+FFFD.
    assert "".join(chunks) == stream.text == model.tokenizer.decode(reply).replace(REPLACEMENT, "")
    assert not any(REPLACEMENT in c for c in chunks)
