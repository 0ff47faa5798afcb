"""The `npctalk serve` subprocess the demo starts when no server answers, and stops on exit.

Starting runs in a worker thread (``EngineLink`` submits it), so the frame loop never waits for
``serve --help`` or for the process to spawn. Readiness is not decided here: the link asks ``hello``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from urllib.parse import urlparse

from .config import DemoConfig

log = logging.getLogger(__name__)

STOP_WAIT_S = 5.0   # SIGTERM, then this long (the server drains for at most 1 s), then SIGKILL
LOG_TAIL_LINES = 6  # lines of the server's log shown when it fails


class StartError(Exception):
    """The demo cannot start a server (no bundle, not a local endpoint); the message says what to do."""


def is_local(endpoint: str) -> bool:
    """Only a server on this machine can be started by the demo."""
    if endpoint.startswith("ipc://"):
        return True
    parsed = urlparse(endpoint)
    return parsed.scheme == "tcp" and parsed.hostname in ("127.0.0.1", "localhost", "::1")


def serve_supports(flag: str) -> bool:
    """Whether this npctalk's ``serve`` takes ``flag`` (read from ``npctalk serve --help``)."""
    out = subprocess.run([sys.executable, "-m", "npctalk.engine.cli", "serve", "--help"], check=False,
                         capture_output=True, text=True, timeout=60)
    return flag in out.stdout


def serve_command(config: DemoConfig, with_memory: bool) -> list[str]:
    """The command line of the server the demo starts."""
    threads = config.server_threads or max(1, (os.cpu_count() or 2) - 1)  # leave a core for the game
    command = [sys.executable, "-m", "npctalk.engine.cli", "serve", "--model", str(config.model_path),
               "--bind", config.endpoint, "--threads", str(threads), "--drain-timeout", "1",
               "--max-new-tokens", str(max(256, config.max_new_tokens))]
    if with_memory:
        command += ["--memory-db", str(config.memory_db_path)]
    return command + list(config.server_args)


class ServerProcess:
    """One started server. ``start`` may block (call it off the frame loop); the rest never does."""

    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self.remembers = False  # started with --memory-db

    def start(self) -> None:
        """Spawn the server; raises ``StartError`` when it cannot be started at all."""
        config = self.config
        if not is_local(config.endpoint):
            raise StartError(f"No server answers at {config.endpoint}, and the demo only starts servers on "
                             "127.0.0.1 or ipc://; start `npctalk serve` there yourself.")
        if not (config.model_path / "manifest.json").is_file():
            raise StartError(f"No model bundle at {config.model_path}. Build it with `export-onnx default` "
                             "(or `make demo`), or pass --model BUNDLE.")
        self.remembers = serve_supports("--memory-db")
        if self.remembers:
            config.memory_db_path.parent.mkdir(parents=True, exist_ok=True)
        else:
            log.info("This npctalk serve has no --memory-db: NPCs remember the player until the server stops.")
        command = serve_command(config, self.remembers)
        config.server_log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("Starting the engine: %s (log: %s)", " ".join(command), config.server_log_path)
        with open(config.server_log_path, "ab") as server_log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=server_log)

    @property
    def exited(self) -> int | None:
        """The exit code once the process has ended, else None."""
        return self.process.poll() if self.process is not None else None

    def log_tail(self) -> str:
        """The last lines of the server's log (why it failed)."""
        try:
            lines = self.config.server_log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if it hangs. Safe to call twice."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            log.warning("The engine did not stop within %g s of SIGTERM; killing it.", STOP_WAIT_S)
            process.kill()
            process.wait(STOP_WAIT_S)
        log.info("Stopped the engine (exit code %s).", process.returncode)
