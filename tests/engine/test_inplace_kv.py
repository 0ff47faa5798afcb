"""In-place KV (GroupQueryAttention writing into the cache's own buffers) == the plain path, and safe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from npctalk.engine.batch import DecodeBatch
from npctalk.engine.errors import ConfigError, GenerationError
from npctalk.engine.kv_cache import KVCache
from npctalk.engine.model import Model
from npctalk.engine.prefix_cache import share

PROMPT = "Hello traveller, welcome to the village of Ashford."


@pytest.fixture(params=["gpt2", "llama"])
def pair(request: pytest.FixtureRequest) -> tuple[Model, Model]:
    """The same tiny bundle loaded twice: in place with tiny growth steps (so buffers fill up and
    grow during a test), and plain."""
    bundle: Path = request.getfixturevalue(f"{request.param}_bundle")
    return (Model(bundle, provider="cpu", intra_op_threads=1, kv_growth=3),
            Model(bundle, provider="cpu", intra_op_threads=1, inplace_kv=False))


def _greedy(model: Model, ids: list[int], steps: int, cache: KVCache | None = None) -> tuple[list[int], list[np.ndarray]]:
    cache = cache or model.new_cache()
    logits = model.forward(np.array([ids]), cache)
    tokens, seen = [], [logits]
    for _ in range(steps):
        tokens.append(int(logits[0].argmax()))
        logits = model.forward(np.array([[tokens[-1]]]), cache)
        seen.append(logits)
    return tokens, seen


def test_in_place_and_plain_give_the_same_greedy_tokens(pair: tuple[Model, Model]) -> None:
    inplace, plain = pair
    assert inplace.inplace_kv and not plain.inplace_kv
    ids = inplace.tokenizer.encode(PROMPT)
    got, got_logits = _greedy(inplace, ids, 16)
    want, want_logits = _greedy(plain, ids, 16)
    assert got == want
    for a, b in zip(got_logits, want_logits):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_steps_write_into_the_same_buffers_until_they_fill(pair: tuple[Model, Model]) -> None:
    inplace, _ = pair
    cache = inplace.new_cache()
    inplace.forward(np.array([inplace.tokenizer.encode(PROMPT)]), cache)
    first = cache._keys[0]
    assert cache.capacity == cache.length + 3                  # kv_growth 3: room for three more positions
    for _ in range(3):
        inplace.forward(np.array([[7]]), cache)
        assert cache._keys[0] is first                         # no allocation, no copy of the cache
    inplace.forward(np.array([[7]]), cache)
    assert cache._keys[0] is not first and cache.capacity == cache.length + 3   # full: grown once


def test_seq_after_a_past_in_place_matches_plain(pair: tuple[Model, Model]) -> None:
    """Chunked prefill and persona-prefix continuation: several new tokens after a past (batch 1)."""
    ids = pair[0].tokenizer.encode(PROMPT)
    results = []
    for model in pair:
        cache = model.new_cache()
        for start in range(0, len(ids), 4):
            logits = model.forward(np.array([ids[start:start + 4]]), cache)
        results.append((logits, [k.copy() for k in cache.keys]))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_left_padded_batch_in_place_matches_plain(pair: tuple[Model, Model]) -> None:
    words = PROMPT.split()
    prompts = [pair[0].tokenizer.encode(" ".join(words[:n])) for n in (2, 5, 8)]
    outputs = []
    for model in pair:
        batch: DecodeBatch[int] = DecodeBatch(model)
        joiners, tokens = [], []
        for row, ids in enumerate(prompts):
            cache = model.new_cache()
            tokens.append(int(model.forward(np.array([ids]), cache)[0].argmax()))
            joiners.append((row, cache))
        batch.add(joiners)
        steps = []
        for step in range(8):
            if step == 4:
                batch.remove({1})                                  # a row leaves: re-pack, then in place again
                tokens = [tokens[0], tokens[2]]
            logits = batch.forward(tokens)
            tokens = logits.argmax(axis=1).tolist()
            steps.append(logits)
        outputs.append(steps)
    for a, b in zip(*outputs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_shared_snapshot_is_never_written(pair: tuple[Model, Model]) -> None:
    """What the prefix cache keeps stays as it was while the live cache goes on, rewinds and goes on."""
    inplace, _ = pair
    ids = inplace.tokenizer.encode(PROMPT)
    cache = inplace.new_cache()
    inplace.forward(np.array([ids]), cache)
    snapshot = share(cache)
    saved = [k.copy() for k in snapshot.keys] + [v.copy() for v in snapshot.values]
    for token in (5, 9, 11):
        inplace.forward(np.array([[token]]), cache)
    cache.rewind(len(ids) - 2)
    for token in (13, 17, 19, 23):
        inplace.forward(np.array([[token]]), cache)
    for before, now in zip(saved, [*snapshot.keys, *snapshot.values]):
        np.testing.assert_array_equal(before, now)
    # And the snapshot is still a good starting point: the same logits as a fresh prefill.
    again = share(snapshot)
    a = inplace.forward(np.array([[29]]), again)
    fresh = inplace.new_cache()
    inplace.forward(np.array([ids]), fresh)
    np.testing.assert_allclose(a, inplace.forward(np.array([[29]]), fresh), rtol=1e-6, atol=1e-6)


def test_reserve_and_advance_refuse_what_would_corrupt() -> None:
    cache = KVCache(1, 1, 2, 4, np.float32)
    with pytest.raises(GenerationError, match="reserve"):
        cache.reserve(5, 4)
    with pytest.raises(GenerationError, match="owned"):
        cache.advance(np.ones((1, 2), np.int64))                 # nothing reserved
    cache.reserve(2, 4)
    with pytest.raises(GenerationError, match="capacity 4"):
        cache.advance(np.ones((1, 5), np.int64))
    cache.advance(np.ones((1, 2), np.int64))
    assert cache.length == 2 and cache.capacity == 4 and cache.keys[0].shape == (1, 2, 2, 4)
    cache.keys = [np.zeros((1, 2, 2, 4), np.float32)]            # someone else's arrays: not ours to write
    assert cache.capacity == cache.length == 2


def test_kv_growth_must_be_positive(gpt2_bundle: Path) -> None:
    with pytest.raises(ConfigError, match="kv_growth"):
        Model(gpt2_bundle, provider="cpu", kv_growth=0)


def test_the_prefix_cache_keeps_exactly_the_prefix_not_the_buffer(pair: tuple[Model, Model]) -> None:
    """A snapshot of an in-place cache is copied out of its (bigger) buffer: the LRU's byte count is
    what it keeps alive, and the live cache's buffer can be freed."""
    from npctalk.engine.prefix_cache import PrefixCache, cache_bytes

    inplace, _ = pair
    ids = inplace.tokenizer.encode(PROMPT)
    cache = inplace.new_cache()
    inplace.forward(np.array([ids]), cache)
    assert cache.capacity > cache.length
    store = PrefixCache(10_000_000)
    key = PrefixCache.key("bram", ids)
    assert store.put(key, cache)
    got = store.get(key)
    assert got is not None and store.bytes == cache_bytes(got)
    for array, live in zip([*got.keys, *got.values], [*cache.keys, *cache.values]):
        assert array.base is None and array.flags.c_contiguous    # its own memory, exactly (1, heads, n, dim)
        assert not np.shares_memory(array, live)
        np.testing.assert_array_equal(array, live)


def test_a_big_batch_grows_by_fewer_positions(llama_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spare room is bounded in bytes: many rows get less headroom each (never under 16 positions)."""
    import npctalk.engine.model as model_module

    model = Model(llama_bundle, provider="cpu", intra_op_threads=1)
    m = model.manifest
    per_row_position = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4
    monkeypatch.setattr(model_module, "KV_HEADROOM_BYTES", per_row_position * 40)   # room for 40 row-positions
    for rows, room in ((1, 40), (2, 20), (8, 16)):
        cache = model.new_cache(rows)
        model.forward(np.full((rows, 3), 7), cache)
        assert cache.capacity - cache.length == room, rows


def test_a_prefix_snapshot_does_not_keep_the_live_buffers_alive(pair: tuple[Model, Model]) -> None:
    """Neither through its arrays nor through what is copied along with the cache (the IOBinding of
    the buffers): once the live cache is gone, its in-place buffers are freed."""
    import gc
    import weakref

    from npctalk.engine.prefix_cache import PrefixCache

    inplace, _ = pair
    ids = inplace.tokenizer.encode(PROMPT)
    cache = inplace.new_cache()
    inplace.forward(np.array([ids[:-1]]), cache)
    inplace.forward(np.array([ids[-1:]]), cache)                  # a second step through the same binding
    assert cache.binding is not None and cache.capacity > cache.length
    buffer = weakref.ref(cache._keys[0])
    store = PrefixCache(10_000_000)
    key = PrefixCache.key("bram", ids)
    assert store.put(key, cache)
    del cache
    gc.collect()
    assert buffer() is None
    snapshot = store.get(key)
    assert snapshot is not None and snapshot.binding is None and snapshot.length == len(ids)


def test_a_repacked_batch_is_stepped_in_place_without_a_second_copy(pair: tuple[Model, Model]) -> None:
    """Rows joining or leaving re-pack the batch once, into buffers with the model's room to grow:
    the steps after write into those very buffers (before, each re-pack was copied again to grow)."""
    inplace, _ = pair
    batch: DecodeBatch[int] = DecodeBatch(inplace)
    joiners = []
    for row, n in enumerate((2, 5, 8)):
        cache = inplace.new_cache()
        inplace.forward(np.array([inplace.tokenizer.encode(" ".join(PROMPT.split()[:n]))]), cache)
        joiners.append((row, cache))
    for change in (lambda: batch.add(joiners), lambda: batch.remove({1})):
        change()
        packed = batch.cache._keys[0]
        assert batch.cache.capacity == batch.cache.length + inplace.kv_room(len(batch))
        batch.forward([7] * len(batch))
        assert batch.cache._keys[0] is packed
