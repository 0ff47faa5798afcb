"""How a slot-decoder server reads says whose persona prefix is cached: timed both ways on the device
(read_policy), and the settings the server takes from it (server.slot_settings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from npctalk.engine import server
from npctalk.engine.read_policy import ReadTimes, time_reads
from npctalk.engine.scheduler_config import DEFAULT_PREFILL_CHUNK, SchedulerConfig
from npctalk.engine.slot_model import SlotModel
from npctalk.engine.slots import SlotDecoder


def test_both_ways_are_timed_and_the_slots_left_empty(gpt2_slots_bundle: Path) -> None:
    decoder = SlotDecoder(gpt2_slots_bundle, 5, 400, provider="cpu")
    times = time_reads(decoder, repeats=1)
    assert times is not None and times.alone_ms > 0 and times.together_ms > 0
    assert times.same_first_tokens  # both ways read the same prompts to the same first tokens
    assert not decoder.lengths.any(), "every slot the timing used is empty again"
    assert decoder.greedy([[5, 6, 7]], 4)  # and the decoder still decodes


def test_a_failing_read_leaves_the_slots_empty_and_the_server_reads_turns_alone(
        gpt2_slots_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = SlotDecoder(gpt2_slots_bundle, 5, 400, provider="cpu")

    def broken(*args: object) -> None:
        raise RuntimeError("device lost")

    monkeypatch.setattr(decoder, "prefill_many", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        time_reads(decoder)
    assert not decoder.lengths.any()
    model = SlotModel(decoder)
    config = server.slot_settings(model, server.ServerConfig(), on_gpu=True)  # logs a warning, serves on
    assert config.scheduler.group_cached is False and config.scheduler.prefill_chunk == server.CUDA_PREFILL_CHUNK


def test_the_timing_captures_no_cuda_graph(gpt2_slots_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The timing runs on the thread that loads the server; with decode-ahead only the decode worker
    may run the graphs, so every step of the timing runs without one and the setting comes back."""
    decoder = SlotDecoder(gpt2_slots_bundle, 5, 400, provider="cpu")
    decoder.cuda_graph = True  # as on a GPU (the CPU session never sees a graph id: every step below is plain)
    seen: list[bool] = []
    step = decoder._step

    def recording(ids: object, mask: object) -> object:
        seen.append(decoder.cuda_graph)
        return step(ids, mask)

    monkeypatch.setattr(decoder, "_step", recording)
    assert time_reads(decoder, repeats=1) is not None
    assert seen and not any(seen) and decoder.cuda_graph is True


def test_no_timing_without_room_for_the_burst(gpt2_slots_bundle: Path) -> None:
    assert time_reads(SlotDecoder(gpt2_slots_bundle, 4, 400, provider="cpu")) is None  # 4 says + 1 slot
    assert time_reads(SlotDecoder(gpt2_slots_bundle, 5, 200, provider="cpu")) is None  # 256 + 48 tokens
    busy = SlotDecoder(gpt2_slots_bundle, 5, 400, provider="cpu")
    busy.prefill(2, [5, 6, 7])
    assert time_reads(busy) is None


def test_together_only_when_clearly_cheaper() -> None:
    assert ReadTimes(alone_ms=10.0, together_ms=7.9, same_first_tokens=True).together
    assert not ReadTimes(alone_ms=10.0, together_ms=8.0, same_first_tokens=True).together  # under MARGIN of alone, not just under
    assert not ReadTimes(alone_ms=2.0, together_ms=6.0, same_first_tokens=True).together


@pytest.fixture
def slots(gpt2_slots_bundle: Path) -> SlotModel:
    return SlotModel.open(gpt2_slots_bundle, 8, 400, provider="cpu")


@pytest.mark.parametrize("alone, together, grouped", [(10.0, 3.0, True), (3.0, 10.0, False)])
def test_a_gpu_server_reads_the_way_it_timed_cheaper(slots: SlotModel, monkeypatch: pytest.MonkeyPatch,
                                                     alone: float, together: float, grouped: bool) -> None:
    monkeypatch.setattr(server, "time_reads", lambda decoder: ReadTimes(alone, together, True))
    config = server.slot_settings(slots, server.ServerConfig(), on_gpu=True)
    assert config.scheduler.group_cached is grouped
    assert config.scheduler.prefill_chunk == (0 if grouped else server.CUDA_PREFILL_CHUNK)


def test_a_cpu_server_does_not_time_and_reads_turns_alone(slots: SlotModel, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(decoder: SlotDecoder) -> ReadTimes:
        raise AssertionError("a CPU server timed the reads")

    monkeypatch.setattr(server, "time_reads", never)
    config = server.slot_settings(slots, server.ServerConfig(), on_gpu=False)
    assert config.scheduler.group_cached is False and config.scheduler.prefill_chunk == DEFAULT_PREFILL_CHUNK
    on = server.slot_settings(slots, server.ServerConfig(group_cached="on"), on_gpu=False)
    assert on.scheduler.group_cached is True and on.scheduler.prefill_chunk == 0
    kept = server.ServerConfig(scheduler=SchedulerConfig(prefill_chunk=32), group_cached="on")
    assert server.slot_settings(slots, kept, on_gpu=False).scheduler.prefill_chunk == 32  # asked for: kept
    off = server.slot_settings(slots, server.ServerConfig(group_cached="off"), on_gpu=True)
    assert off.scheduler.group_cached is False and off.scheduler.prefill_chunk == server.CUDA_PREFILL_CHUNK

