"""Demo settings: one frozen dataclass the command line fills in, plus where the demo keeps its files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from npctalk.engine import paths
from npctalk.engine.protocol import DEFAULT_ENDPOINT


def demo_home() -> Path:
    """``<npctalk home>/demo``: the NPC memory database, the server log and the headless screenshot."""
    return paths.home() / "demo"


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo needs to know. Times in seconds, sizes in pixels, lengths in tokens."""

    endpoint: str = DEFAULT_ENDPOINT      # where `npctalk serve` listens (or will, once the demo starts it)
    model: Path | None = None             # bundle for a server the demo starts; None: the default bundle
    autostart: bool = True                # start `npctalk serve` when nothing answers `hello`
    memory_db: Path | None = None         # NPC memory across restarts (when serve has --memory-db); None: demo_home()
    server_threads: int | None = None     # ONNX Runtime threads of a started server; None: all cores but one
    server_args: tuple[str, ...] = ()     # more `npctalk serve` flags for a started server (e.g. --provider cuda)
    server_log: Path | None = None        # stderr of a started server; None: demo_home()/server.log
    server_start_timeout_s: float = 180.0  # loading a bundle may take a while on a cold disk
    player: str = "traveller"             # the player id NPCs remember
    max_new_tokens: int = 64              # reply length asked of the server
    width: int = 960
    height: int = 640
    fps: int = 60                         # frame-rate cap (clock.tick)
    reply_timeout_s: float = 10.0         # server silence during a reply before it counts as gone (a CPU
                                          # prefill of a long persona prompt can hold the server for seconds)
    probe_interval_s: float = 0.5         # how often an absent server is asked `hello` again
    health_interval_s: float = 5.0        # how often an idle, connected server is asked `hello`
    probe_timeout_s: float = 1.0          # how long one `hello` may take before the server counts as absent
    max_restarts: int = 3                 # times a started server that died is started again
    notices: Path | None = None           # LICENSE-NOTICES to show on the credits screen; None: found

    def __post_init__(self) -> None:
        if self.width < 640 or self.height < 480:
            raise ValueError(f"The window must be at least 640x480 pixels, got {self.width}x{self.height}.")
        if self.fps <= 0 or self.max_new_tokens <= 0:
            raise ValueError(f"fps and max_new_tokens must be positive, got {self.fps} and {self.max_new_tokens}.")
        times = (self.reply_timeout_s, self.probe_interval_s, self.health_interval_s, self.probe_timeout_s,
                 self.server_start_timeout_s)
        if min(times) <= 0:
            raise ValueError("Probe intervals and timeouts must be positive seconds.")

    @property
    def model_path(self) -> Path:
        return self.model if self.model is not None else paths.default_bundle_path()

    @property
    def memory_db_path(self) -> Path:
        return self.memory_db if self.memory_db is not None else demo_home() / "memory.sqlite"

    @property
    def server_log_path(self) -> Path:
        return self.server_log if self.server_log is not None else demo_home() / "server.log"
