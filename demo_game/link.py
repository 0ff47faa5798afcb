"""The game's link to the engine: find or start the server, stream replies, survive its loss.

One enum holds the link's state; ``update()`` (once per frame) makes every transition::

    PROBING ──hello ok──────────────────────────────► ONLINE
       │ no answer, autostart                            │ stream fails (server gone), server
       ▼                                                 │ process exited, or health hello fails
    STARTING ──hello ok──► ONLINE                        ▼
       │ process exits / start fails / timeout        LOST ──hello ok──► ONLINE
       ▼                                                 │ our process exited: start it again
    FAILED (message on screen; the game keeps running;   └──► STARTING (at most max_restarts times)
            a server that answers hello later is used)

Nothing here blocks a frame: ``hello`` probes and the server's start run on one worker thread
(``Client.hello`` waits by design), and the game's own ``Client`` is only ever ``poll``ed.

A reply never waits forever. The client fails it when the server goes silent (``reply_timeout_s``);
when the demo's own server process exits, its replies fail at once; a server restarted by someone
else fails them at the client's next heartbeat (its answer to ``ping`` names the replies it does not
hold); and, as a last resort, a reply still open past the server's own deadline
(``request_timeout_ms`` from ``hello``) plus ``reply_timeout_s`` is cancelled and failed.
"""

from __future__ import annotations

import enum
import logging
import subprocess
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import zmq
from npctalk.client import Client, ClientError, DoneEvent, ErrorEvent, Event, Reply, ServerUnavailable

DEFAULT_REQUEST_TIMEOUT_S = 60.0  # the server's deadline for a reply when its hello does not say

from .config import DemoConfig
from .server_proc import ServerProcess, StartError

log = logging.getLogger(__name__)


class LinkState(enum.Enum):
    PROBING = "probing"    # asking `hello`; nothing known yet
    STARTING = "starting"  # our server process is loading its model
    ONLINE = "online"
    LOST = "lost"          # was online; asking `hello` until it answers again
    FAILED = "failed"      # no server and none can be started


def probe(endpoint: str, timeout_s: float, context: zmq.Context[Any]) -> dict[str, Any] | None:
    """The server's ``hello`` answer, or None when nothing answers within ``timeout_s`` (blocks)."""
    client = Client(endpoint, timeout=timeout_s, retries=0, context=context)
    try:
        return client.hello()
    except ClientError as exc:
        log.debug("hello at %s: %s", endpoint, exc)
        return None
    finally:
        client.close()


def recall(endpoint: str, npcs: list[str], player: str, timeout_s: float, context: zmq.Context[Any]) -> dict[str, int]:
    """How many exchanges each NPC remembers with ``player`` (``memory.get``; blocks). Empty on failure."""
    client = Client(endpoint, timeout=timeout_s, retries=0, context=context)
    try:
        return {npc: len(client.memory(npc, player).get("turns", [])) for npc in npcs}
    except ClientError as exc:
        log.info("Could not read the NPCs' memory: %s", exc)
        return {}
    finally:
        client.close()


class EngineLink:
    """See the module docstring. Owned by the game loop's thread; ``close()`` on exit."""

    def __init__(self, config: DemoConfig, clock: Any = time.monotonic) -> None:
        self.config, self.clock = config, clock
        self.context = zmq.Context()
        self.client = Client(config.endpoint, timeout=config.reply_timeout_s, context=self.context)
        self.state = LinkState.PROBING
        self.message = f"Looking for the engine at {config.endpoint}…"
        self.hello: dict[str, Any] = {}
        self.server: ServerProcess | None = None
        self.restarts = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="npctalk-demo-link")
        self._probe: Future[dict[str, Any] | None] | None = None
        self._start: Future[None] | None = None
        self._next_probe = clock()
        self._starting_since = clock()
        self._replies: dict[str, tuple[Reply, float]] = {}  # replies on their way: (reply, sent at)
        self._lost: list[Event] = []  # failures the link decided, delivered by the next update()
        self.remembered: dict[str, int] = {}  # NPC → exchanges it remembers with the player (from memory.get)
        self._recall: Future[dict[str, int]] | None = None

    # --- once per frame -------------------------------------------------------------------------------

    def update(self) -> list[Event]:
        """Advance the state machine and return the reply events that arrived (never blocks)."""
        now = self.clock()
        events = self._poll_client() + self._overdue(now)
        if self.server is not None and self.server.exited is not None and self.state in (LinkState.ONLINE, LinkState.STARTING):
            self._server_exited(now)
        if self._start is not None and self._start.done():
            self._start_finished(self._start)
        if self._recall is not None and self._recall.done():
            self.remembered, self._recall = self._recall.result(), None
        if self._probe is not None and self._probe.done():
            self._probe_finished(self._probe.result(), now)
        elif self._probe is None and self._start is None and now >= self._next_probe and self._wants_probe():
            # A connected server may be busy prefilling for someone else: give it the reply timeout.
            timeout = self.config.reply_timeout_s if self.online else self.config.probe_timeout_s
            self._probe = self._worker.submit(probe, self.config.endpoint, timeout, self.context)
        events, self._lost = events + self._lost, []
        return events

    def _poll_client(self) -> list[Event]:
        try:
            events = self.client.poll()
        except ClientError as exc:  # the send queue is full: the server stopped reading long ago
            self._lose(f"The engine stopped reading ({exc}). Reconnecting…")
            return []
        for event in events:
            if not isinstance(event, (DoneEvent, ErrorEvent)):
                continue
            self._replies.pop(event.id, None)
            if isinstance(event, ErrorEvent) and isinstance(event.error, ServerUnavailable):
                self._lose("The engine went away mid-reply. Reconnecting…")
        return events

    def _overdue(self, now: float) -> list[Event]:
        """Fail replies open past the server's own deadline: the server that took them is gone."""
        capabilities = self.hello.get("capabilities", {})
        limit = capabilities.get("request_timeout_ms", DEFAULT_REQUEST_TIMEOUT_S * 1000) / 1000 + self.config.reply_timeout_s
        overdue = [rid for rid, (_, sent) in self._replies.items() if now - sent > limit]
        events: list[Event] = []
        for rid in overdue:
            reply, _ = self._replies.pop(rid)
            self.cancel(reply)
            events.append(ErrorEvent(rid, reply.npc, ServerUnavailable(
                f"Reply {rid!r} did not finish within {limit:g} s (the server's deadline has passed).")))
        return events

    def _drop_replies(self, why: str) -> None:
        """Fail every reply on its way and start a fresh client: the server that took them is gone."""
        for rid, (reply, _) in self._replies.items():
            self._lost.append(ErrorEvent(rid, reply.npc, ServerUnavailable(why)))
        self._replies.clear()
        self.client.close()  # its open streams can never finish; a new socket starts clean
        self.client = Client(self.config.endpoint, timeout=self.config.reply_timeout_s, context=self.context)

    def _wants_probe(self) -> bool:
        if self.state is LinkState.ONLINE:
            return not self._replies  # a streaming reply already proves the server is alive
        return True  # FAILED too: a server started by hand is still found

    def _probe_finished(self, hello: dict[str, Any] | None, now: float) -> None:
        self._probe = None
        if hello is not None:
            self._next_probe = now + self.config.health_interval_s
            if self.state is not LinkState.ONLINE:
                self.hello, self.state = hello, LinkState.ONLINE
                model = hello.get("model", {}).get("name", "unknown model")
                self.message = f"Connected to the engine ({model})."
                log.info("Engine online at %s: %s", self.config.endpoint, hello.get("model"))
            return
        self._next_probe = now + self.config.probe_interval_s
        if self.state is LinkState.ONLINE:
            self._lose("The engine stopped answering. Reconnecting…")
        elif self.state is LinkState.PROBING:
            self._start_server(now, "No engine is running")
        elif self.state is LinkState.STARTING and now - self._starting_since > self.config.server_start_timeout_s:
            self._fail(f"The engine did not answer within {self.config.server_start_timeout_s:g} s of starting.")
        elif self.state is LinkState.LOST and self.server is not None and self.server.exited is not None:
            self._server_exited(now)

    # --- the server process ---------------------------------------------------------------------------

    def _start_server(self, now: float, why: str) -> None:
        if not self.config.autostart:
            self.state = LinkState.LOST if self.state is LinkState.LOST else LinkState.PROBING
            self.message = f"{why} at {self.config.endpoint}; waiting for `npctalk serve` to start there…"
            return
        if self.server is not None:
            self.server.stop()
        self.server = ServerProcess(self.config)
        self.state, self._starting_since = LinkState.STARTING, now
        self.message = f"{why}: starting the engine (loading {self.config.model_path.name})…"
        self._start = self._worker.submit(self.server.start)

    def _start_finished(self, future: Future[None]) -> None:
        self._start = None
        try:
            future.result()
        except (StartError, OSError, subprocess.SubprocessError) as exc:
            self._fail(str(exc))

    def _server_exited(self, now: float) -> None:
        assert self.server is not None
        code, tail = self.server.exited, self.server.log_tail()
        log.warning("The engine process exited with code %s. Its log ends:\n%s", code, tail)
        self.server.stop()  # forget the process, so its exit is handled once
        if self._replies:
            self._drop_replies(f"The engine process exited (code {code}) mid-reply.")
        if self.state is LinkState.STARTING:
            self._fail(f"The engine exited while starting (code {code}): {tail.splitlines()[-1] if tail else 'no log'}")
        elif self.restarts < self.config.max_restarts:
            self.restarts += 1
            self._start_server(now, f"The engine stopped (code {code})")
        else:
            self._fail(f"The engine stopped (code {code}) {self.restarts} times; giving up.")

    # --- transitions ----------------------------------------------------------------------------------

    def _lose(self, message: str) -> None:
        if self.state in (LinkState.FAILED, LinkState.LOST, LinkState.STARTING):
            return
        log.warning("%s", message)
        self.state, self.message = LinkState.LOST, message
        self._next_probe = self.clock()

    def _fail(self, message: str) -> None:
        log.error("%s", message)
        self.state, self.message = LinkState.FAILED, message

    # --- the game's calls -----------------------------------------------------------------------------

    @property
    def online(self) -> bool:
        return self.state is LinkState.ONLINE

    def say(self, npc: str, text: str, context: Mapping[str, Any]) -> Reply:
        """Start a streaming reply (never blocks); raises ``ClientError`` when it cannot be sent."""
        reply = self.client.say(npc, text, player=self.config.player, context=context,
                                max_new_tokens=self.config.max_new_tokens)
        self._replies[reply.id] = (reply, self.clock())
        return reply

    def recall(self, npcs: list[str]) -> None:
        """Ask, off the frame loop, what ``npcs`` remember of the player; ``remembered`` fills in later."""
        if "memory.get" in self.hello.get("capabilities", {}).get("ops", []) and self._recall is None:
            self._recall = self._worker.submit(recall, self.config.endpoint, npcs, self.config.player,
                                               self.config.reply_timeout_s, self.context)

    def cancel(self, reply: Reply) -> None:
        try:
            reply.cancel()
        except ClientError as exc:
            log.debug("Could not cancel %s: %s", reply.id, exc)

    def close(self) -> None:
        """Close the socket, stop a server the demo started, end the worker thread."""
        self.client.close()
        self._worker.shutdown(wait=True, cancel_futures=True)
        if self.server is not None:
            self.server.stop()
        self.context.term()
