"""Progress reporting for export: numbered stages and a heartbeat for long steps, all via ``logging``.

    [3/7] exporting the ONNX graph
          … still exporting the ONNX graph (20 s)

Library code never prints; the CLI decides where log records go.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0  # seconds between "still working" lines during a long step


class Stages:
    """Numbers the stages of one export: ``stages.next("validating")`` logs ``[5/7] validating``.

    Not thread-safe; one export owns one instance.
    """

    def __init__(self, total: int, logger: logging.Logger = log) -> None:
        self.total = total
        self.current = 0
        self._log = logger
        self._started = time.monotonic()

    def next(self, title: str) -> None:
        self.current += 1
        self._log.info("[%d/%d] %s", self.current, self.total, title)

    @property
    def elapsed_s(self) -> float:
        """Seconds since the first stage was announced."""
        return time.monotonic() - self._started


@contextmanager
def heartbeat(what: str, every_s: float = HEARTBEAT_S, logger: logging.Logger = log) -> Iterator[None]:
    """Log ``… still <what> (N s)`` every ``every_s`` seconds until the block ends.

    The work runs in the calling thread; a daemon thread only logs, so a step that cannot report its
    own progress (torch tracing, GGUF dequantization) still shows the export is alive.
    """
    done = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not done.wait(every_s):
            logger.info("      … still %s (%.0f s)", what, time.monotonic() - start)

    thread = threading.Thread(target=beat, name=f"heartbeat: {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        logger.debug("%s took %.1f s", what, time.monotonic() - start)
