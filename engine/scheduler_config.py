"""The scheduler's settings (``SchedulerConfig``): capacity, how much prompt a step reads, the
persona-prefix cache, sampling candidates, decode-ahead and how cached-prefix says are read.
The CLI and the server fill it in; ``scheduler.Scheduler`` follows it."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .topk import DEFAULT_TOP_TOKENS

# Prompt tokens per step. SmolLM2-135M on the 2-core CPU VM (bench/results/concurrency-long-prompt-*):
# while a ~435-token prompt joins, a running stream's worst gap is 0.55 s at 64 instead of 2.7 s whole
# (32: 0.44 s, 16: 0.27 s), and the joiner's first token comes 15% later (32: +45%, 16: +88%).
DEFAULT_PREFILL_CHUNK = 64


@dataclass(frozen=True)
class SchedulerConfig:
    """Capacity: ``max_batch`` streams decode (or prefill) together, ``max_queue`` more may wait (counts);
    ``prefill_chunk`` caps the prompt tokens run per step (tokens; a longer prompt continues next
    step; 0: prompts run whole, then ``prefill_tokens`` caps a step's prompts and one always goes);
    ``prefix_cache_bytes`` bounds the persona-prefix KV cache (0: off); ``top_tokens``: a decode step
    that samples takes each row's this many best logits (``topk``) instead of the whole row, and
    the full row only where they cannot decide (0: always the full row); ``decode_ahead``: the next
    decode step runs on a worker thread while the last one's tokens become text and messages
    (see the module doc; off by default); ``group_cached``: queued prompts are read together whole
    (``forward_many``) even when their persona prefix is cached, instead of each turn alone from the
    snapshot: on a GPU a read of a few hundred tokens costs about what a short one does (latency, not
    arithmetic), so one read for several says beats one each (off by default: on a CPU the prefix
    costs its arithmetic again)."""

    max_batch: int = 32
    max_queue: int = 64
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    prefill_tokens: int = 2048
    prefix_cache_bytes: int = 256 * 1024 * 1024
    top_tokens: int = DEFAULT_TOP_TOKENS
    decode_ahead: bool = False
    group_cached: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "prefill_chunk", "prefill_tokens", "prefix_cache_bytes", "top_tokens"):
            value = getattr(self, name)
            low = 1 if name in ("max_batch", "prefill_tokens") else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"SchedulerConfig.{name} must be an integer >= {low}, got {value!r}.")
