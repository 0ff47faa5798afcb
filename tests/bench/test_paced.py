"""bench/paced.py: the slot decoder paced to a GPU's step times, in process and under the socket bench."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import paced  # noqa: E402


def test_step_time_is_linear_between_points_and_flat_beyond() -> None:
    pace = paced.Pace(steps=((1, 1.0), (16, 2.5), (64, 4.9)))
    assert pace.step_ms(1) == 1.0 and pace.step_ms(16) == 2.5
    assert pace.step_ms(8) == pytest.approx(1.0 + 1.5 * 7 / 15)
    assert pace.step_ms(32) == pytest.approx(2.5 + 2.4 * 16 / 48)
    assert pace.step_ms(128) == 4.9  # beyond the table: its last point
    reads = paced.Pace(prefill_ms=2.0, prefill_ms_per_token=0.01)
    assert reads.read_ms(50) == 2.0 and reads.read_ms(1000) == pytest.approx(10.0)


@pytest.mark.parametrize("item", ["16", "a:1", "0:1.5", "4:0", "4:-2"])
def test_step_points_refuse_what_is_not_rows_colon_ms(item: str) -> None:
    with pytest.raises(Exception, match="--step-ms"):
        paced.parse_steps([item])


@pytest.fixture
def paced_decoder(gpt2_slots_bundle: Path) -> Iterator[tuple[paced.Pace, object]]:
    """A slot decoder opened while the pace is installed (every step 15 ms, a prompt read 25 ms)."""
    from npctalk.engine.slots import SlotDecoder

    pace = paced.Pace(steps=((1, 15.0), (4, 15.0)), prefill_ms=25.0)
    restore = paced.install(pace)
    try:
        yield pace, SlotDecoder(gpt2_slots_bundle, 4, 64, provider="cpu")
    finally:
        restore()


def test_paced_steps_take_the_target_time_and_write_tokens_by_rule(paced_decoder: tuple[paced.Pace, object]) -> None:
    pace, decoder = paced_decoder
    eos = set(decoder.manifest.eos_token_ids)
    start = time.perf_counter()
    first = decoder.prefill(0, [5, 6, 7])
    assert int(decoder.logits()[0].argmax()) == first and first not in eos
    decoder.prefill(1, [8, 9])
    assert time.perf_counter() - start >= 0.050  # two reads, 25 ms each
    tokens = np.array([10, 11, 0, 0])
    seen = []
    for _ in range(4):
        start = time.perf_counter()
        out = decoder.step(tokens, np.array([True, True, False, False]))
        assert time.perf_counter() - start >= 0.015
        logits = decoder.logits()
        assert list(logits[:2].argmax(axis=1)) == list(out[:2])  # the logits agree with the tokens
        assert not eos & set(out[:2].tolist())  # a reply never ends early
        seen.append(out[:2].tolist())
        tokens = out
    assert len({tuple(s) for s in seen}) > 1  # tokens change as positions advance
    assert list(decoder.lengths[:2]) == [7, 6]  # the decoder's bookkeeping ran as usual
    runs = pace.counts
    assert runs["prefill"]["runs"] == 2 and runs["step-2"]["runs"] == 4
    assert runs["step-2"]["over_target"] == 0 and runs["prefill"]["over_target"] == 0  # nothing runs the model
    decoder.prefill_many([2, 3], [[5, 6, 7, 8], [9, 10]])  # one read of both, then a step
    assert runs["prefill-many"]["runs"] == 1 and list(decoder.lengths) == [7, 6, 4, 2]


def test_restore_gives_back_the_real_decoder(gpt2_slots_bundle: Path) -> None:
    from npctalk.engine.slots import SlotDecoder

    from npctalk.engine import server, topk

    plain = SlotDecoder(gpt2_slots_bundle, 2, 32, provider="cpu").greedy([[5, 6, 7]], 6)
    before = (topk.TopK.of_value, topk.TopK.row_of_value, server.slot_settings, server.load_model)
    restore = paced.install(paced.Pace(steps=((1, 1.0),), prefill_ms=1.0))
    assert topk.TopK.of_value is not before[0] and server.slot_settings is not before[2]
    restore()
    assert (topk.TopK.of_value, topk.TopK.row_of_value, server.slot_settings, server.load_model) == before
    again = SlotDecoder(gpt2_slots_bundle, 2, 32, provider="cpu")
    assert type(again.session).__name__ == "InferenceSession"
    assert again.greedy([[5, 6, 7]], 6) == plain


def test_socket_bench_through_a_paced_server_runs_at_the_pace(gpt2_slots_bundle: Path, tmp_path: Path) -> None:
    """One stream whose prompt read takes 5 ms and every step 20 ms cannot pass 12 tokens in 225 ms
    (the tiny model alone runs hundreds a second); the report carries the paced runs, and every reply
    still runs to its length."""
    command = [sys.executable, "bench/concurrency.py", "--model", str(gpt2_slots_bundle), "--provider", "cpu",
               "--streams", "1", "3", "--max-new-tokens", "12", "--slot-context", "400", "--out", str(tmp_path),
               "--paced", "--step-ms 1:20 4:20 --prefill-ms 5", "--tag", "paced"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [report_file] = tmp_path.glob("concurrency-*-paced.json")
    report = json.loads(report_file.read_text())
    one, three = report["levels"]
    assert one["completion_tokens"] == 12 and three["completion_tokens"] == 36
    assert one["aggregate_tok_s"] <= 12 / (0.005 + 11 * 0.020)
    # A CUDA server's settings: 512 prompt tokens a step; at this pace four turns alone (4 × 5 ms) beat
    # four whole prompts together (a 5 ms read and a 20 ms step), so the timed policy reads them alone.
    assert (one["server_prefill_chunk"], one["server_group_cached"]) == (512, False)
    assert one["gap_ms_p50"] >= 19.5
    runs = report["paced"]["runs"]
    assert report["paced"]["steps"] == [[1, 20.0], [4, 20.0]]
    steps = [r for kind, r in runs.items() if kind.startswith("step-")]
    assert sum(r["runs"] for r in steps) >= 11 and all(r["over_target"] == 0 for r in steps)
    assert "**Paced**" in next(tmp_path.glob("concurrency-*-paced.md")).read_text()


def test_the_paced_server_takes_a_cuda_server_s_settings(gpt2_slots_bundle: Path) -> None:
    """As on a GPU: 512 prompt tokens a step, and the read policy timed on the paced reads, where four
    turns alone (4 × 10 ms) lose to four whole prompts together (one 10 ms read and a step): together,
    with whole prompts a step."""
    from npctalk.engine import server
    from npctalk.engine.scheduler_config import DEFAULT_PREFILL_CHUNK, SchedulerConfig

    restore = paced.install(paced.Pace(steps=((1, 2.0), (8, 2.0)), prefill_ms=10.0))
    try:
        _, config = server.load_model(gpt2_slots_bundle, server.ServerConfig(), provider="cpu")
        assert config.scheduler.group_cached is True and config.scheduler.prefill_chunk == 0
        off = server.ServerConfig(group_cached="off")
        assert server.load_model(gpt2_slots_bundle, off, provider="cpu")[1].scheduler.prefill_chunk == server.CUDA_PREFILL_CHUNK
        asked = server.ServerConfig(scheduler=SchedulerConfig(prefill_chunk=32), group_cached="off")
        assert server.load_model(gpt2_slots_bundle, asked, provider="cpu")[1].scheduler.prefill_chunk == 32
    finally:
        restore()
    _, plain = server.load_model(gpt2_slots_bundle, server.ServerConfig(), provider="cpu")
    assert plain.scheduler.prefill_chunk == DEFAULT_PREFILL_CHUNK and plain.scheduler.group_cached is False


def test_the_table_comes_from_a_decode_results_file(tmp_path: Path) -> None:
    """H100 run 2's committed DialoGPT-medium file gives the defaults' table; a file without the
    architecture's slot-decoder rows is refused."""
    run2 = REPO / "bench" / "results" / "decode-nvidia-h100-80gb-hbm3-vm-2026-11-26-dialogpt-medium-run2.json"
    steps, prefill = paced.from_decode(run2, "dialogpt-medium")
    assert [rows for rows, _ in steps] == [1, 16, 64]
    assert [round(ms, 2) for _, ms in steps] == [ms for _, ms in paced.DEFAULT_STEPS]
    assert prefill == 2.49
    with pytest.raises(ValueError, match="no npctalk-slots decode row for 'smollm2-135m'"):
        paced.from_decode(run2, "smollm2-135m")


@pytest.fixture(scope="module")
def wide_slots_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 with 5,000 logits a row (its tokenizer knows 400 ids): sampled rows take the
    top-candidates path, as a real model's 50k vocabulary does."""
    from tiny_models import build_tiny_gpt2

    from npctalk.export.api import ExportOptions, export_bundle

    hf = build_tiny_gpt2(tmp_path_factory.mktemp("hf") / "wide-gpt2", vocab_size=5000)
    return export_bundle(hf, tmp_path_factory.mktemp("bundles") / "wide-gpt2-slots", ExportOptions(dtype="fp32", layout="slots"))


def test_synthetic_candidates_are_what_topk_finds_in_the_synthetic_rows() -> None:
    from types import SimpleNamespace

    from npctalk.engine.topk import TopK

    decoder = SimpleNamespace(manifest=SimpleNamespace(vocab_size=5000, eos_token_ids=(0,)),
                              tokenizer=SimpleNamespace(vocab_size=400))
    rule = paced.Synthetic(decoder)
    picked = rule.pick(np.array([5, 9, 123]), np.array([10, 11, 12]))
    assert set(picked.tolist()) <= set(range(1, 400))
    ids, values = rule.top(picked, 64)
    want_ids, want_values = TopK(64).of_array(rule.logits(picked).reshape(3, -1))
    for row in range(3):
        assert set(ids[row].tolist()) == set(want_ids[row].tolist()) and ids[row, 0] == picked[row]
        assert sorted(values[row].tolist()) == pytest.approx(sorted(want_values[row].tolist()))


def test_sampled_steps_of_a_big_vocabulary_take_candidates_by_rule(wide_slots_bundle: Path) -> None:
    """A sampled stream on the 5,000-logit model: steps write no logits rows, the TopK is by rule and
    held to its time, every token is one the tokenizer knows, and the reply runs to its length."""
    import dataclasses

    from npctalk.engine.request import Request, RequestKey
    from npctalk.engine.sampling import CHAT_DEFAULTS
    from npctalk.engine.scheduler import Scheduler, SchedulerConfig
    from npctalk.engine.slot_model import SlotModel

    pace = paced.Pace(steps=((1, 0.5), (4, 0.5)), prefill_ms=0.5, topk_ms=2.0)
    restore = paced.install(pace)
    try:
        model = SlotModel.open(wide_slots_bundle, 4, 256, provider="cpu")
        scheduler = Scheduler(model, SchedulerConfig(max_batch=2))
        options = dataclasses.replace(CHAT_DEFAULTS, max_new_tokens=12, fact_bias=0.0, seed=3)
        request = Request(RequestKey(b"c", "r"), [5, 6, 7], options, model.tokenizer,
                          frozenset(model.manifest.eos_token_ids), 256, received_at=0.0)
        assert scheduler.submit(request)
        while scheduler.has_work:
            scheduler.step()
    finally:
        restore()
    assert request.finish_reason == "length" and len(request.tokens) >= 12
    assert max(request.tokens) < model.tokenizer.vocab_size
    assert scheduler.stats()["sampled"]["from_top"] >= 10  # the candidates decided the sampled steps
    assert pace.counts["topk"]["runs"] >= 10 and pace.counts["topk"]["wall_ms"] >= 2.0 * pace.counts["topk"]["runs"]
