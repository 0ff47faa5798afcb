"""How a server on the slot decoder reads says whose persona prefix is cached, decided by timing.

Such a say can be read two ways: its turn alone, after the prefix's snapshot is copied into its slot
(few tokens: cheap where reading costs arithmetic, as on a CPU), or its whole prompt together with
the other queued ones in one ``prefill_many`` (``SchedulerConfig.group_cached``: more tokens, one
call; cheap where a read costs its latency more than its tokens, as on a GPU). Which is cheaper
depends on the device and the model, so a CUDA server times both once at start (``time_reads``,
a few milliseconds there) with prompts shaped like a game's: ``SAYS`` says of a ``PREFIX``-token
persona prefix and a ``TURN``-token turn. It reads together when that took under ``MARGIN`` of
the time alone. On a CPU the server does not time them (reading ``SAYS`` whole prompts costs
seconds there) and reads turns alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .slots import SlotDecoder

SAYS = 4        # says in the timed burst
PREFIX = 256    # persona-prefix tokens of each
TURN = 48       # turn tokens after it (notes, history, the player's line)
REPEATS = 3     # timed rounds of each way, after one to warm up; the median counts
MARGIN = 0.8    # together must take under this share of alone to be chosen


@dataclass(frozen=True)
class ReadTimes:
    """Median milliseconds to read ``SAYS`` says each way, up to each one's first-token logits."""

    alone_ms: float
    together_ms: float
    same_first_tokens: bool  # both ways gave every say the same greedy first token (last round)

    @property
    def together(self) -> bool:
        """Whether reading whole prompts together is clearly the cheaper way."""
        return self.together_ms < MARGIN * self.alone_ms


def time_reads(decoder: SlotDecoder, says: int = SAYS, prefix: int = PREFIX, turn: int = TURN,
               repeats: int = REPEATS) -> ReadTimes | None:
    """Time a burst of ``says`` cached-prefix says read both ways on ``decoder``, whose first
    ``says + 1`` slots must be empty (they are empty again afterwards). None when the decoder has
    too few slots or too short ones for such prompts."""
    if decoder.slots < says + 1 or decoder.capacity < prefix + turn or np.any(decoder.lengths[:says + 1] > 0):
        return None
    rng = np.random.default_rng(0)
    vocab = decoder.manifest.vocab_size
    head = rng.integers(10, vocab, size=prefix).tolist()
    tails = [rng.integers(10, vocab, size=turn).tolist() for _ in range(says)]
    # No CUDA graph is captured here, on the thread that loads the server: with decode-ahead the decode
    # worker must be the only thread to run the graphs (ONNX Runtime), so it captures them all.
    graphs, decoder.cuda_graph = decoder.cuda_graph, False
    try:
        decoder.prefill(says, head)
        snapshot = decoder.snapshot(says)
        decoder.release(says)

        def alone() -> list[int]:
            first = []
            for slot in range(says):
                decoder.restore(slot, snapshot)
                decoder.prefill(slot, tails[slot])
                first.append(int(decoder.logits()[0].argmax()))  # on the host: the read has finished
            return first

        def together() -> list[int]:
            decoder.prefill_many(list(range(says)), [head + tail for tail in tails])
            return [int(t) for t in decoder.logits()[:says].argmax(axis=1)]

        times: dict[str, list[float]] = {"alone": [], "together": []}
        first: dict[str, list[int]] = {}
        for _ in range(repeats + 1):
            for name, run in (("alone", alone), ("together", together)):
                start = time.perf_counter()
                first[name] = run()
                times[name].append((time.perf_counter() - start) * 1e3)
                for slot in range(says):
                    decoder.release(slot)
    finally:  # a failure leaves the slots as it found them: empty
        for slot in range(says + 1):
            decoder.release(slot)
        decoder.cuda_graph = graphs
    return ReadTimes(float(np.median(times["alone"][1:])), float(np.median(times["together"][1:])),
                     first["alone"] == first["together"])
