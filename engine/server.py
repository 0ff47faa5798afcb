"""``npctalk serve``: the ZeroMQ ROUTER server in front of the scheduler (protocol: ``protocol.py``).

One thread runs one loop::

    receive   poll the socket (zero timeout while streams run, IDLE_POLL_MS when idle) and answer up
              to MAX_INCOMING_PER_TURN messages with non-blocking sends
    step      scheduler.step(): one batched decode step for every active stream
    send      each token/done/error event, non-blocking
    sweep     every SWEEP_S: cancel the streams of clients that have gone quiet

Why one loop and no socket thread: every socket call is non-blocking (``NOBLOCK`` sends, polls with
zero timeout between steps), so I/O never stalls decoding, and libzmq's own I/O thread moves bytes
and answers ZMTP heartbeats even while a forward runs. A second Python thread would only fight the
decode loop for the GIL, and would need locks around the scheduler; here nothing is shared, a
``cancel`` read between two steps takes effect in the next one, and ordering is trivially right.
The price is that a ``ping`` waits for the current step: one decode step plus at most
``SchedulerConfig.prefill_chunk`` prompt tokens, however long a joining prompt is.

Backpressure and vanished clients: ``ROUTER_MANDATORY`` makes a send to a gone peer fail with
EHOSTUNREACH and a send to a peer whose queue holds ``send_hwm`` messages fail with EAGAIN; either
way that client's streams are cancelled and their remaining tokens dropped, so a client that stops
reading holds at most ``send_hwm`` messages (plus ``send_buffer`` bytes) of server memory. Its
streams still end properly: ``delivery.Delivery`` sends each one's terminal message, rewritten to
follow the last message delivered, once the client reads again. ZMTP heartbeats (``heartbeat_s``)
drop dead TCP peers; a client with live streams that sends nothing (not even ``ping``) for
``client_timeout_s`` is treated as gone too.

SIGTERM/SIGINT: stop accepting ``say`` (answered ``busy``), let running streams finish for up to
``drain_timeout_s``, cancel the rest, flush, exit 0.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import zmq

from . import protocol
from .delivery import Delivery, SendResult
from .errors import ConfigError, ServeError
from .handlers import Handlers
from .memory import MemoryConfig
from .model import Model
from .npcs import NpcRegistry
from .request import Event
from .read_policy import SAYS, time_reads
from .sampling import CHAT_DEFAULTS, SearchOptions
from .scheduler import Scheduler
from .scheduler_config import DEFAULT_PREFILL_CHUNK, SchedulerConfig
from .store import MemoryStore
from .security import CurveServer, CurveServerConfig
from .slot_model import SlotModel, open_model

log = logging.getLogger(__name__)

IDLE_POLL_MS = 50            # how long the idle loop waits for a message before checking signals
MAX_INCOMING_PER_TURN = 256  # messages answered between two steps, so a flood cannot starve decoding
# Time answering messages between two steps (at least one is read): a say costs ~0.3 ms (persona,
# memory, grounding), so 64 says at once held every running stream ~25 ms; the rest wait in the
# socket for the next turn. A step reads a bounded share of the queued prompts anyway (prefill_chunk).
RECEIVE_BUDGET_S = 0.002
SWEEP_S = 0.25               # how often quiet clients are looked for
CLOSE_LINGER_MS = 1000       # how long closing waits to flush the last messages


def _default_options() -> SearchOptions:
    return dataclasses.replace(CHAT_DEFAULTS, max_new_tokens=64)  # chat's sampling, shorter replies


@dataclass(frozen=True)
class ServerConfig:
    """Server settings. Times in seconds, sizes in tokens or messages; ``defaults`` fill unset say fields."""

    bind: str = protocol.DEFAULT_ENDPOINT
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    defaults: SearchOptions = field(default_factory=_default_options)
    max_new_tokens: int = 256         # the most one say may ask for
    request_timeout_s: float = 60.0   # deadline from receipt to done; then a timeout error
    client_timeout_s: float = 15.0    # a client with streams that sends nothing this long is gone
    heartbeat_s: float = 1.0          # ZMTP heartbeat interval (dead TCP peers are dropped after 3)
    send_hwm: int = 1000              # messages queued per client before it counts as not reading
    send_buffer: int = 0              # kernel send buffer per TCP client in bytes (SO_SNDBUF); 0: the OS default
    drain_timeout_s: float = 10.0     # on SIGTERM, how long running streams may finish
    personas_dir: Path | None = None
    max_npcs: int = 1024
    curve: CurveServerConfig | None = None  # CURVE keys for remote use (security.py); None: plain TCP
    memory: MemoryConfig = field(default_factory=MemoryConfig)  # SQLite file (":memory:" here; serve: a file), window
    group_cached: str = "auto"        # cached-prefix says read together whole: "on", "off", "auto" (timed on a GPU)

    def __post_init__(self) -> None:
        if self.group_cached not in ("auto", "on", "off"):
            raise ConfigError(f"ServerConfig.group_cached must be 'auto', 'on' or 'off', got {self.group_cached!r}.")


class Server:
    """A bound ROUTER socket, the handlers and the scheduler. ``run()`` serves until ``request_stop``."""

    def __init__(self, model: Model | Any, config: ServerConfig = ServerConfig(),
                 registry: NpcRegistry | None = None) -> None:
        self.config = config
        self.model = model
        self.scheduler = Scheduler(model, config.scheduler)
        self.memory = MemoryStore(config.memory)  # StoreError (a ServeError) when the database is unusable
        self.handlers = Handlers(model, self.scheduler, config,
                                 registry or NpcRegistry.with_builtins(config.personas_dir, config.max_npcs),
                                 self.memory)
        self._stop = threading.Event()
        self._last_seen: dict[bytes, float] = {}   # clients with live streams → when they last sent anything
        self._gone: set[bytes] = set()             # clients whose connection is gone: nothing is sent to them
        self._delivery = Delivery(self._send_raw, give_up_s=config.client_timeout_s)
        self.handlers.holds = lambda key: self.scheduler.has_live(key) or self._delivery.holds(key)
        self._context: zmq.Context = zmq.Context.instance()
        self._curve = CurveServer(self._context, config.curve) if config.curve else None
        try:
            self._socket = self._bind(config)
        except ServeError:
            self.close_security()
            self.memory.close()
            raise
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def _bind(self, config: ServerConfig) -> zmq.Socket:
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_SOCKET_MESSAGE_BYTES)
        sock.setsockopt(zmq.SNDHWM, config.send_hwm)
        if config.send_buffer:
            sock.setsockopt(zmq.SNDBUF, config.send_buffer)
        sock.setsockopt(zmq.RCVHWM, 4 * (config.scheduler.max_batch + config.scheduler.max_queue) + 256)
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(config.heartbeat_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(config.heartbeat_s * 3000))
        sock.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
        if self._curve:
            self._curve.apply(sock)
        try:
            sock.bind(config.bind)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ServeError(f"Cannot bind {config.bind}: {exc.strerror}. Is another server running there?") from exc
        if not _is_local(config.bind) and not self._curve:
            log.warning("Listening on %s, reachable from other machines, unencrypted and without authentication; "
                        "use --curve-secret-key (and --curve-clients) or bind to 127.0.0.1 or ipc:// unless the "
                        "network is trusted.", config.bind)
        return sock

    def close_security(self) -> None:
        """Stop the CURVE ZAP handler thread, if one runs (idempotent)."""
        if self._curve:
            self._curve.close()

    def request_stop(self) -> None:
        """Begin a graceful shutdown (safe from signal handlers and other threads)."""
        self._stop.set()

    def run(self) -> int:
        """Serve until stopped; returns the exit code (0)."""
        m = self.model.manifest
        log.info("npctalk serve: listening on %s (model %s, %s batching, max_batch %d, max_queue %d)", self.endpoint,
                 m.name, "padded" if self.scheduler.batched else "no", self.config.scheduler.max_batch,
                 self.config.scheduler.max_queue)
        try:
            with _stop_on_signals(self.request_stop):
                self._loop()
        finally:
            self._socket.close(linger=CLOSE_LINGER_MS)
            self.memory.close()
            self.close_security()
        log.info("npctalk serve: stopped.")
        return 0

    def _loop(self) -> None:
        drain_until: float | None = None
        cancelled_rest = False
        next_sweep = 0.0
        while True:
            now = time.monotonic()
            if self._stop.is_set() and drain_until is None:
                drain_until = now + self.config.drain_timeout_s
                self.handlers.accepting = False
                log.info("Stopping: %d streams running, %d queued; waiting up to %.1f s for them.",
                         self.scheduler.active_count, self.scheduler.queued_count, self.config.drain_timeout_s)
            if drain_until is not None:
                if not self.scheduler.has_work:
                    return
                if now >= drain_until and not cancelled_rest:
                    cancelled_rest = True
                    log.info("Drain time is over: cancelling %d streams.", self.scheduler.cancel_all())
            self._receive(0 if self.scheduler.has_work else IDLE_POLL_MS)
            if self.scheduler.has_work:
                self._step()
            if self._delivery.waiting:
                self._delivery.retry(time.monotonic())
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + SWEEP_S

    def _receive(self, timeout_ms: int) -> None:
        """Answer waiting messages until ``RECEIVE_BUDGET_S`` or ``MAX_INCOMING_PER_TURN`` is spent."""
        if not self._socket.poll(timeout_ms, zmq.POLLIN):
            return
        until = time.monotonic() + RECEIVE_BUDGET_S
        for _ in range(MAX_INCOMING_PER_TURN):
            if time.monotonic() > until:
                return
            try:
                identity, *frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_seen[identity] = time.monotonic()
            self._gone.discard(identity)
            reply = self.handlers.handle(identity, frames)
            if reply is not None:
                self._send(identity, reply)

    def _step(self) -> None:
        try:
            events: list[Event] = self.scheduler.step(emit=self._deliver)  # first tokens go out before the decode
        except Exception:  # a scheduler bug must not take the server down with it
            log.exception("The engine step failed; failing every live stream.")
            events = self.scheduler.abort_all("The engine failed; the error is in the server's log.")
        self._deliver(events)

    def _deliver(self, events: list[Event]) -> None:
        """Send each event's message to its client (unless gone); finished exchanges are recorded."""
        now = time.monotonic()
        messages = self.handlers.messages_for(events)  # also records the finished exchanges, one commit for all
        for event, message in zip(events, messages):
            key = event.request.key
            if key.client not in self._gone:
                self._after_send(key.client, self._delivery.stream(key, message, now))

    def _send(self, identity: bytes, message: dict[str, Any]) -> None:
        """Answer a request; a client that cannot take the answer loses its streams."""
        self._after_send(identity, self._send_raw(identity, message))

    def _send_raw(self, identity: bytes, message: dict[str, Any]) -> SendResult:
        try:
            self._socket.send_multipart([identity, protocol.encode(message)], zmq.NOBLOCK)
            return SendResult.SENT
        except zmq.Again:
            return SendResult.FULL
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:  # nothing a client does should reach here; never stop serving
                log.error("Sending to client %s failed: %s.", identity.hex(), exc)
            return SendResult.GONE

    def _after_send(self, identity: bytes, result: SendResult) -> None:
        if result is SendResult.FULL:
            self._drop_client(identity, "is not reading (its queue is full)")
        elif result is SendResult.GONE:
            self._gone.add(identity)
            self._drop_client(identity, "is gone")

    def _drop_client(self, identity: bytes, why: str) -> None:
        cancelled = self.scheduler.cancel_client(identity)
        if cancelled:
            self.handlers.counters["clients_dropped"] += 1
            log.info("Client %s %s: cancelling its %d streams.", identity.hex(), why, cancelled)

    def _sweep(self, now: float) -> None:
        live = self.scheduler.live_clients()
        for identity in live:
            quiet = now - self._last_seen.get(identity, now)
            if quiet > self.config.client_timeout_s:
                self._last_seen[identity] = now  # cancel once; the next step ends the streams
                self.handlers.counters["clients_dropped"] += 1
                log.info("Client %s sent nothing for %.1f s: cancelling its %d streams.", identity.hex(), quiet,
                         self.scheduler.cancel_client(identity))
        # Bookkeeping only for clients that still have streams: bounded by the scheduler's capacity.
        self._last_seen = {c: t for c, t in self._last_seen.items() if c in live}
        self._gone &= live


def _is_local(endpoint: str) -> bool:
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or *: all interfaces


@contextmanager
def _stop_on_signals(stop: Any) -> Iterator[None]:
    """SIGTERM and SIGINT call ``stop`` while the server runs (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("Received %s.", signal.Signals(signum).name)
        stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def serve(bundle: Path, config: ServerConfig = ServerConfig(), *, provider: str = "auto",
          intra_op_threads: int | None = None, spin: bool = True, slot_context: int | None = None) -> int:
    """Load ``bundle`` and serve it until SIGTERM/SIGINT; returns the exit code."""
    # An unusable memory database fails now, before the slow model load (embeddings load with the server).
    MemoryStore(dataclasses.replace(config.memory, embeddings="off")).close()
    model, config = load_model(bundle, config, provider=provider, intra_op_threads=intra_op_threads, spin=spin,
                               slot_context=slot_context)
    return Server(model, config).run()


SPARE_SLOTS = 4  # slots beyond max_batch: reranking's scoring rows take slots while candidates hold theirs
# Prompt tokens per step on a GPU (the CPU default is 64): DialoGPT-medium prefills 256 tokens in 2.5 ms
# on an H100 (bench/results/decode-nvidia-h100-*), so a step with a full chunk stays near 10 ms.
CUDA_PREFILL_CHUNK = 512


def load_model(bundle: Path, config: ServerConfig, *, provider: str = "auto", intra_op_threads: int | None = None,
               spin: bool = True, slot_context: int | None = None) -> tuple[Model | SlotModel, ServerConfig]:
    """The bundle as the server runs it (``slot_model.open_model``): a slots-layout bundle (CUDA) on
    the slot decoder with a KV slot for each of ``max_batch`` streams (+ spares; persona prefixes are
    copied into them from snapshots on the device), its settings from ``slot_settings``; anything
    else on ``Model``."""
    model = open_model(bundle, provider=provider, intra_op_threads=intra_op_threads, spin=spin,  # type: ignore[arg-type]
                       slots=config.scheduler.max_batch + SPARE_SLOTS, slot_context=slot_context)
    if not isinstance(model, SlotModel):
        return model, config
    return model, slot_settings(model, config, on_gpu=model.provider == "cuda")


def slot_settings(model: SlotModel, config: ServerConfig, *, on_gpu: bool) -> ServerConfig:
    """``config`` for the slot decoder. On a GPU: ``CUDA_PREFILL_CHUNK`` prompt tokens a step unless
    ``--prefill-chunk`` says otherwise, and says whose persona prefix is cached read the way
    ``read_policy.time_reads`` finds cheaper on this device (``group_cached`` "auto"). Read together
    ("auto" chose it, or "on"), a default prompt budget becomes whole prompts (chunk 0) so groups form."""
    scheduler = config.scheduler
    default_chunk = scheduler.prefill_chunk == DEFAULT_PREFILL_CHUNK
    if on_gpu and default_chunk:
        # The CPU's chunk would admit 64 prompt tokens a step; a GPU prefills 512 in a few ms.
        scheduler = dataclasses.replace(scheduler, prefill_chunk=CUDA_PREFILL_CHUNK)
        log.info("Slot decoder on %s: prefill chunk %d tokens per step.", model.provider, CUDA_PREFILL_CHUNK)
    together = config.group_cached == "on"
    if config.group_cached == "auto" and on_gpu:
        try:
            times = time_reads(model.decoder)
        except Exception as exc:  # a device that cannot run the timing still serves, reading turns alone
            log.warning("Timing the reads of cached-prefix says failed (%s); reading their turns alone.", exc)
        else:
            if times is None:
                log.info("Says with a cached persona prefix: their turns are read alone (the slots are too few or "
                         "too short to time a burst of %d).", SAYS)
            else:
                together = times.together
                log.info("%d says with a cached persona prefix: read alone %.2f ms, whole and together %.2f ms; "
                         "reading them %s.", SAYS, times.alone_ms, times.together_ms, "together" if together else "alone")
    if together:
        scheduler = dataclasses.replace(scheduler, group_cached=True, prefill_chunk=0 if default_chunk else scheduler.prefill_chunk)
    return dataclasses.replace(config, scheduler=scheduler) if scheduler != config.scheduler else config
