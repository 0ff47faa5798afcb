"""Snapshots of a KV slot (persona prefixes on the slot decoder): a restored prefix runs on as if read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from npctalk.engine.errors import GenerationError
from npctalk.engine.model import Model
from npctalk.engine.slots import SlotDecoder

PROMPT = list(range(100, 133))  # 33 tokens: a 20-token "persona prefix", then the turn
OTHER = list(range(5, 45))      # another stream, longer than the prefix: it leaves stale positions behind


@pytest.fixture(params=["gpt2", "llama"])
def family(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """(mask-layout bundle, slots-layout bundle) of the same tiny model."""
    return (request.getfixturevalue(f"{request.param}_bundle"), request.getfixturevalue(f"{request.param}_slots_bundle"))


@pytest.fixture(params=[False, True], ids=["numpy", "graphs"])
def copy_graphs(request: pytest.FixtureRequest) -> bool:
    """Copy with numpy (the CPU's way) or with the ONNX graphs a GPU runs."""
    return request.param


def _reference(bundle: Path, prompt: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """The last prompt position's logits and ``steps`` greedy tokens, through Model (mask layout)."""
    model = Model(bundle, provider="cpu", intra_op_threads=1)
    cache = model.new_cache(1)
    logits = first = model.forward(np.array([prompt]), cache)
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits[0].argmax()))
        logits = model.forward(np.array([[tokens[-1]]]), cache)
    return first, tokens


def _decoder(bundle: Path, copy_graphs: bool, slots: int = 4) -> SlotDecoder:
    decoder = SlotDecoder(bundle, slots=slots, capacity=64, provider="cpu", intra_op_threads=1)
    decoder.copy_graphs = copy_graphs
    return decoder


def _continue(decoder: SlotDecoder, slot: int, rest: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """Prefill ``rest`` after what ``slot`` holds, then ``steps`` greedy tokens with only that slot active."""
    tokens = [decoder.prefill(slot, rest)]
    logits = decoder.logits()
    active = np.zeros(decoder.slots, dtype=bool)
    active[slot] = True
    while len(tokens) < steps:
        feed = np.zeros(decoder.slots, dtype=np.int64)
        feed[slot] = tokens[-1]
        tokens.append(int(decoder.step(feed, active)[slot]))
    return logits, tokens


def test_a_restored_prefix_runs_on_as_the_whole_prompt_would(family: tuple[Path, Path], copy_graphs: bool) -> None:
    mask, slots = family
    want_logits, want = _reference(mask, PROMPT, 8)
    decoder = _decoder(slots, copy_graphs)
    assert decoder.copier.graph is copy_graphs
    decoder.greedy([OTHER, OTHER, OTHER], 4)          # every slot but the last has held a longer stream
    for slot in range(3):
        decoder.release(slot)
    decoder.prefill(0, PROMPT)                        # the whole prompt: its first 20 positions are the prefix
    snapshot = decoder.snapshot(0, 20)
    assert snapshot.length == 20 and len(snapshot.tensors) == 2 * decoder.manifest.num_layers
    m = decoder.manifest
    assert snapshot.nbytes == 2 * m.num_layers * m.num_kv_heads * 20 * m.head_dim * 4
    decoder.release(0)
    decoder.prefill(0, OTHER)                         # the source slot is overwritten: the snapshot is a copy
    for slot in (1, 2):                               # one snapshot, two streams
        decoder.restore(slot, snapshot)
        assert int(decoder.lengths[slot]) == 20
        logits, tokens = _continue(decoder, slot, PROMPT[20:], 8)
        np.testing.assert_allclose(logits, want_logits, atol=1e-4)
        assert tokens == want


def test_a_snapshot_holds_exactly_the_slot_s_first_positions(family: tuple[Path, Path], copy_graphs: bool) -> None:
    _, slots = family
    decoder = _decoder(slots, copy_graphs, slots=3)
    decoder.prefill(1, PROMPT)
    whole = decoder.snapshot(1)
    assert whole.length == len(PROMPT)
    part = decoder.snapshot(1, 7)
    for a, b in zip(whole.tensors, part.tensors):
        a, b = np.asarray(a if isinstance(a, np.ndarray) else a.numpy()), np.asarray(b if isinstance(b, np.ndarray) else b.numpy())
        assert a.shape[2] == len(PROMPT) and b.shape[2] == 7
        np.testing.assert_array_equal(a[:, :, :7], b)
        assert np.abs(a).sum() > 0
    decoder.restore(2, part)
    for buffer in decoder.copier.arrays or []:        # numpy: the slot's positions 0..6 are the snapshot's
        np.testing.assert_array_equal(buffer[2, :, :7], buffer[1, :, :7])


def test_snapshot_and_restore_refuse_what_they_cannot_do(gpt2_slots_bundle: Path, llama_slots_bundle: Path) -> None:
    slots = gpt2_slots_bundle
    decoder = _decoder(slots, False, slots=2)
    with pytest.raises(GenerationError, match="takes 1..0 positions"):
        decoder.snapshot(0)                            # an empty slot has nothing to copy
    decoder.prefill(0, PROMPT[:10])
    for n in (0, 11, -1):
        with pytest.raises(GenerationError, match="takes 1..10 positions"):
            decoder.snapshot(0, n)
    snapshot = decoder.snapshot(0)
    with pytest.raises(GenerationError, match="restore needs an empty slot"):
        decoder.restore(0, snapshot)
    with pytest.raises(GenerationError, match="SlotSnapshot"):
        decoder.restore(1, "not a snapshot")  # type: ignore[arg-type]
    with pytest.raises(GenerationError, match="slot must be"):
        decoder.restore(2, snapshot)
    other = SlotDecoder(slots, slots=1, capacity=64, provider="cpu")   # the same model in another decoder: fine
    other.prefill(0, PROMPT[:3])
    decoder.restore(1, other.snapshot(0))
    assert int(decoder.lengths[1]) == 3
    decoder.release(1)
    foreign = SlotDecoder(llama_slots_bundle, slots=1, capacity=64, provider="cpu")  # another model's KV: no fit
    foreign.prefill(0, PROMPT[:3])
    with pytest.raises(GenerationError, match="does not fit"):
        decoder.restore(1, foreign.snapshot(0))
    assert int(decoder.lengths[1]) == 0
