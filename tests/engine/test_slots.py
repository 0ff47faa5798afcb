"""SlotDecoder (the CUDA fast path, run here on the CPU provider) == Model on the mask layout, token for token."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from npctalk.engine.errors import BundleError, ConfigError, ContextOverflowError, GenerationError
from npctalk.engine.generator import Generator, GeneratorParams
from npctalk.engine.model import Model
from npctalk.engine.slots import SlotDecoder

PROMPTS = [list(range(5, 25)), list(range(40, 47)), list(range(100, 133))]  # three lengths: no padding anywhere


@pytest.fixture(params=["gpt2", "llama"])
def family(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """(mask-layout bundle, slots-layout bundle) of the same tiny model."""
    return (request.getfixturevalue(f"{request.param}_bundle"), request.getfixturevalue(f"{request.param}_slots_bundle"))


def _reference(bundle: Path, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens of ``prompt`` alone through Model (mask layout), and the logits of each step."""
    model = Model(bundle, provider="cpu", intra_op_threads=1)
    cache = model.new_cache(1)
    logits = model.forward(np.array([prompt]), cache)
    tokens, seen = [], [logits]
    for _ in range(steps - 1):
        tokens.append(int(logits[0].argmax()))
        logits = model.forward(np.array([[tokens[-1]]]), cache)
        seen.append(logits)
    tokens.append(int(logits[0].argmax()))
    return tokens, seen


def test_batched_slots_give_each_stream_its_own_greedy_tokens(family: tuple[Path, Path]) -> None:
    mask, slots = family
    want = [_reference(mask, p, 12)[0] for p in PROMPTS]
    decoder = SlotDecoder(slots, slots=4, capacity=96, provider="cpu", intra_op_threads=1)
    assert decoder.device == "cpu" and not decoder.cuda_graph
    assert decoder.greedy(PROMPTS, 12) == want
    assert decoder.lengths.tolist() == [len(p) + 11 for p in PROMPTS] + [0]


def test_step_logits_equal_the_model_s(family: tuple[Path, Path]) -> None:
    mask, slots = family
    _, seen = _reference(mask, PROMPTS[0], 4)
    decoder = SlotDecoder(slots, slots=2, capacity=64, provider="cpu")
    token = decoder.prefill(0, PROMPTS[0])
    np.testing.assert_allclose(decoder.logits(), seen[0], atol=1e-5)
    for step in range(1, 4):
        token = int(decoder.step([token, 0])[0])
        np.testing.assert_allclose(decoder.logits()[:1], seen[step], atol=1e-5)


def test_chunked_prefill_and_slots_left_out_of_steps_keep_their_streams(family: tuple[Path, Path]) -> None:
    mask, slots = family
    want = [_reference(mask, p, 12)[0] for p in PROMPTS[:2]]
    decoder = SlotDecoder(slots, slots=2, capacity=64, provider="cpu")
    decoder.prefill(0, PROMPTS[0][:8])
    a = [decoder.prefill(0, PROMPTS[0][8:])]          # the rest of the prompt after a past
    b = [decoder.prefill(1, PROMPTS[1])]
    for i in range(11):
        active = np.array([True, i % 3 != 0])         # slot 1 sits out every third step
        nxt = decoder.step([a[-1], b[-1]], active)
        a.append(int(nxt[0]))
        if active[1]:
            b.append(int(nxt[1]))
    while len(b) < 12:
        b.append(int(decoder.step([0, b[-1]], [False, True])[1]))
    assert (a, b) == (want[0], want[1])


def test_a_released_slot_serves_a_new_stream_and_rewind_reuses_a_prefix(family: tuple[Path, Path]) -> None:
    mask, slots = family
    decoder = SlotDecoder(slots, slots=1, capacity=64, provider="cpu")
    decoder.greedy([PROMPTS[2]], 6)                    # a longer stream first: stale positions beyond the next one
    decoder.release(0)
    assert decoder.greedy([PROMPTS[1]], 8) == [_reference(mask, PROMPTS[1], 8)[0]]
    decoder.rewind(0, 4)                               # keep a 4-token "persona prefix", then a new line after it
    first = decoder.prefill(0, PROMPTS[0][:5])
    assert first == _reference(mask, PROMPTS[1][:4] + PROMPTS[0][:5], 1)[0][0]


def test_misuse_is_refused_with_clear_errors(family: tuple[Path, Path]) -> None:
    mask, slots = family
    with pytest.raises(BundleError, match="mask layout"):
        SlotDecoder(mask, slots=1, provider="cpu")
    with pytest.raises(ConfigError, match="slots"):
        SlotDecoder(slots, slots=0, provider="cpu")
    with pytest.raises(ConfigError, match="capacity"):
        SlotDecoder(slots, slots=1, capacity=10**6, provider="cpu")
    decoder = SlotDecoder(slots, slots=2, capacity=8, provider="cpu")
    with pytest.raises(GenerationError, match="empty"):
        decoder.step([1, 1], [True, True])
    with pytest.raises(GenerationError, match="slot must be"):
        decoder.prefill(2, [1])
    with pytest.raises(GenerationError, match="Token ids"):
        decoder.prefill(0, [10**6])
    with pytest.raises(ContextOverflowError, match="capacity|more than"):
        decoder.prefill(0, list(range(1, 10)))
    assert decoder.lengths.tolist() == [0, 0]          # a refused prefill leaves the slot as it was
    decoder.prefill(0, list(range(1, 8)))
    decoder.step([3, 0])                               # the 8th token: the slot is full now
    with pytest.raises(ContextOverflowError, match="capacity"):
        decoder.step([3, 0])
    with pytest.raises(GenerationError, match="Cannot rewind"):
        decoder.rewind(1, 3)


def test_model_runs_a_slots_bundle_one_row_per_stream(family: tuple[Path, Path]) -> None:
    """The generic engine (Generator, the server's scheduler) runs slots bundles too: same reply."""
    mask, slots = family
    replies = []
    for bundle in (mask, slots):
        model = Model(bundle, provider="cpu")
        params = GeneratorParams(model)
        params.set_search_options(max_new_tokens=10, do_sample=False)
        gen = Generator(model, params)
        gen.append_tokens(PROMPTS[0])
        while not gen.is_done():
            gen.generate_next_token()
        replies.append(gen.reply_tokens)
    assert replies[0] == replies[1]
    model = Model(slots, provider="cpu")
    assert model.io.slots and not model.inplace_kv
    cache = model.new_cache(2)
    cache.mask = np.array([[0, 1], [1, 1]])
    with pytest.raises(GenerationError, match="slots layout"):
        model.forward(np.array([[1], [2]]), cache)


def test_steps_across_length_buckets_match_the_model(family: tuple[Path, Path]) -> None:
    """total_sequence_length follows the longest slot in LENGTH_BUCKET steps; crossing one changes nothing."""
    from npctalk.engine.slots import LENGTH_BUCKET

    mask, slots = family
    prompt = [5 + i % 300 for i in range(LENGTH_BUCKET - 4)]
    decoder = SlotDecoder(slots, slots=2, capacity=300, provider="cpu")
    assert decoder.greedy([prompt, PROMPTS[1]], 12) == [_reference(mask, p, 12)[0] for p in (prompt, PROMPTS[1])]


def test_a_step_runs_only_the_rows_up_to_the_last_active_slot(family: tuple[Path, Path]) -> None:
    """Slot 0 alone runs one row; slot 5 active makes it eight (a power of two); results stay exact."""
    mask, slots = family
    decoder = SlotDecoder(slots, slots=8, capacity=64, provider="cpu")
    want = _reference(mask, PROMPTS[1], 6)[0]
    got = [decoder.prefill(0, PROMPTS[1])]
    for _ in range(2):
        got.append(int(decoder.step([got[-1]] + [0] * 7)[0]))
    assert decoder.logits().shape[0] == 1
    other = decoder.prefill(5, PROMPTS[0])
    for _ in range(3):
        nxt = decoder.step([got[-1], 0, 0, 0, 0, other, 0, 0])
        got.append(int(nxt[0]))
        other = int(nxt[5])
    assert decoder.logits().shape[0] == 8 and got == want
    assert sorted(decoder._steps) == [1, 8]


def test_prefill_many_reads_new_prompts_together_as_one_at_a_time_would(family: tuple[Path, Path]) -> None:
    """Runs of consecutive slots (0-2, 4-5) around a slot mid-stream (3), prompts of 1 to 33 tokens:
    every new slot gets the logits, greedy token and KV that ``prefill`` gives it alone, and all
    streams (slot 3's too) go on decoding exactly as before."""
    _, slots = family
    prompts = {0: PROMPTS[0], 1: [9], 2: PROMPTS[1], 4: PROMPTS[2], 5: [3, 4]}
    alone = SlotDecoder(slots, slots=8, capacity=64, provider="cpu")
    together = SlotDecoder(slots, slots=8, capacity=64, provider="cpu")
    for decoder in (alone, together):
        decoder.prefill(3, list(range(60, 70)))
        decoder.step([0, 0, 0, 11, 0, 0, 0, 0])
    want = {}
    for slot, prompt in prompts.items():
        want[slot] = (alone.prefill(slot, prompt), alone.logits()[0])
    got = together.prefill_many(list(prompts), list(prompts.values()))
    assert got.tolist() == [want[slot][0] for slot in prompts]
    for slot in prompts:
        np.testing.assert_allclose(together.logits()[slot], want[slot][1], atol=1e-4)
    assert together.lengths.tolist() == alone.lengths.tolist()
    for layer in range(together.manifest.num_layers):  # the host buffers the KV OrtValues wrap: keys, then values
        for buffers in ((together._kv_arrays[layer], alone._kv_arrays[layer]),
                        (together._kv_arrays[together.manifest.num_layers + layer], alone._kv_arrays[alone.manifest.num_layers + layer])):
            for slot in [*prompts, 3]:
                held = int(together.lengths[slot])
                np.testing.assert_allclose(buffers[0][slot, :, :held], buffers[1][slot, :, :held], atol=1e-5)
    tokens = np.zeros(8, dtype=np.int64)
    tokens[list(prompts)] = got
    tokens[3] = 17
    for _ in range(6):
        expected = alone.step(tokens)
        tokens = together.step(tokens)
        assert tokens.tolist() == expected.tolist()
        np.testing.assert_allclose(together.logits(), alone.logits(), atol=1e-4)


def test_prefill_many_refuses_what_it_cannot_do(family: tuple[Path, Path]) -> None:
    _, slots = family
    decoder = SlotDecoder(slots, slots=4, capacity=16, provider="cpu")
    decoder.prefill(1, [5, 6])
    with pytest.raises(GenerationError, match="not empty"):
        decoder.prefill_many([0, 1], [[1, 2], [3]])
    with pytest.raises(GenerationError, match="twice"):
        decoder.prefill_many([0, 0], [[1, 2], [3]])
    with pytest.raises(GenerationError, match="one prompt per slot"):
        decoder.prefill_many([0, 2], [[1, 2]])
    with pytest.raises(ContextOverflowError, match="more than"):
        decoder.prefill_many([0, 2], [[1, 2], list(range(1, 18))])
    with pytest.raises(GenerationError, match="at least one token"):
        decoder.prefill_many([0, 2], [[1, 2], []])
    assert decoder.lengths.tolist() == [0, 2, 0, 0]  # nothing ran
