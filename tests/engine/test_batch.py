"""The decode batch: rows leave and join between steps, a joiner refills a free row in place, and
every row's logits stay those of its stream decoded alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from npctalk.engine.batch import DecodeBatch
from npctalk.engine.kv_cache import KVCache
from npctalk.engine.model import Model

WORDS = "the old mill by the river grinds wheat for the whole village every single morning".split()


@pytest.fixture(params=["gpt2", "llama"])
def model(request: pytest.FixtureRequest) -> Model:
    bundle: Path = request.getfixturevalue(f"{request.param}_bundle")
    return Model(bundle, provider="cpu", intra_op_threads=1)


class Streams:
    """Each row's own single-row cache beside the batch: what its logits must be."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.alone: dict[int, KVCache] = {}

    def joiner(self, row: int, words: int) -> tuple[int, KVCache]:
        ids = self.model.tokenizer.encode(" ".join(WORDS[:words]))
        cache, mine = self.model.new_cache(), self.model.new_cache()
        self.model.forward(np.array([ids]), cache)
        self.model.forward(np.array([ids]), mine)
        self.alone[row] = mine
        return row, cache

    def step(self, batch: DecodeBatch[int], token: int = 7) -> None:
        got = batch.forward([token] * len(batch))
        assert got.shape[0] == len(batch)
        for logits, row in zip(got, batch.rows):
            want = self.model.forward(np.array([[token]]), self.alone[row])[0]
            np.testing.assert_allclose(logits, want, atol=1e-4, err_msg=f"row {row}")


def test_a_joiner_refills_a_free_row_without_copying_the_batch(model: Model) -> None:
    streams, batch = Streams(model), DecodeBatch[int](model)
    batch.add([streams.joiner(row, 3 + row) for row in range(9)])
    streams.step(batch)
    packed, repacks = batch.cache._keys[0], batch.repacks
    batch.remove({4})  # one row of nine free: under the 1/8 share that re-packs
    streams.step(batch)
    batch.add([streams.joiner(9, 2)])  # shorter than the batch: written into the free row
    assert len(batch) == 9 and batch.rows[-1] == 9
    for _ in range(3):
        streams.step(batch)
    assert batch.repacks == repacks and batch.cache._keys[0] is packed


def test_a_joiner_longer_than_the_batch_re_packs_it(model: Model) -> None:
    streams, batch = Streams(model), DecodeBatch[int](model)
    batch.add([streams.joiner(row, 2) for row in range(9)])
    batch.remove({0})
    repacks = batch.repacks
    batch.add([streams.joiner(9, 12)])
    assert batch.repacks == repacks + 1 and batch.cache.length == streams.alone[9].length
    streams.step(batch)


def test_too_many_free_rows_or_shared_padding_re_pack_and_trim(model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    streams, batch = Streams(model), DecodeBatch[int](model)
    batch.add([streams.joiner(0, 14), streams.joiner(1, 2), streams.joiner(2, 3)])
    streams.step(batch)
    repacks, length = batch.repacks, batch.cache.length
    batch.remove({1})  # one of three free: too many
    assert batch.repacks == repacks + 1 and batch.cache.batch_size == 2
    streams.step(batch)
    monkeypatch.setattr(DecodeBatch, "FREE_SHARE", 1)  # no share of free rows is too many now
    monkeypatch.setattr(DecodeBatch, "PADDING", 4)
    batch.add([streams.joiner(3, 2)])  # no free row: re-packed
    repacks = batch.repacks
    batch.remove({0})  # the long row leaves: the others share most of the batch as padding
    assert batch.repacks == repacks + 1 and batch.cache.length < length
    streams.step(batch)


def test_a_batch_with_free_rows_takes_one_token_per_live_row(model: Model) -> None:
    streams, batch = Streams(model), DecodeBatch[int](model)
    batch.add([streams.joiner(row, 3) for row in range(9)])
    batch.remove({2})
    with pytest.raises(ValueError, match="one token per row"):
        batch.forward([7] * 9)
    batch.remove(set(batch.rows))
    assert len(batch) == 0 and batch.cache.batch_size == 0
