"""Frame timing: every frame's interval, split by whether a reply was streaming, and the fps shown.

Intervals are wall-clock seconds from one frame's start to the next (work + the cap's sleep), so a
frame that blocked on anything shows up here. ``summary()`` is what the demo logs at exit.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

FPS_WINDOW = 30  # frames averaged for the on-screen fps


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass(frozen=True)
class FrameSummary:
    """Milliseconds. ``idle_*``: frames with no reply on its way; ``streaming_*``: frames with one (the
    idle frames are the peer the streaming ones are compared with, in the same run)."""

    frames: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    idle_p99_ms: float
    streaming_frames: int
    streaming_p50_ms: float
    streaming_p99_ms: float
    streaming_max_ms: float
    work_p99_ms: float      # the frame's own work (events, update, draw), without the cap's sleep

    def line(self) -> str:
        return (f"{self.frames} frames: p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, max {self.max_ms:.1f} ms; "
                f"idle p99 {self.idle_p99_ms:.1f} ms; "
                f"while streaming ({self.streaming_frames} frames): p50 {self.streaming_p50_ms:.1f} ms, "
                f"p99 {self.streaming_p99_ms:.1f} ms, max {self.streaming_max_ms:.1f} ms; "
                f"work p99 {self.work_p99_ms:.1f} ms")


class FrameStats:
    """Collects frame intervals; ``record`` once per frame."""

    def __init__(self) -> None:
        self.intervals: list[float] = []
        self.streaming: list[float] = []
        self.idle: list[float] = []
        self.work: list[float] = []
        self._recent: deque[float] = deque(maxlen=FPS_WINDOW)

    def record(self, interval_s: float, work_s: float, streaming: bool) -> None:
        self.intervals.append(interval_s)
        self.work.append(work_s)
        self._recent.append(interval_s)
        (self.streaming if streaming else self.idle).append(interval_s)

    @property
    def fps(self) -> float:
        """Frames per second over the last ``FPS_WINDOW`` frames (0 before the first)."""
        total = sum(self._recent)
        return len(self._recent) / total if total > 0 else 0.0

    def summary(self) -> FrameSummary | None:
        if not self.intervals:
            return None
        ms = [v * 1000 for v in self.intervals]
        st = [v * 1000 for v in self.streaming] or [0.0]
        idle = [v * 1000 for v in self.idle] or [0.0]
        return FrameSummary(len(ms), percentile(ms, 50), percentile(ms, 99), max(ms), percentile(idle, 99), len(self.streaming),
                            percentile(st, 50), percentile(st, 99), max(st), percentile([w * 1000 for w in self.work], 99))
