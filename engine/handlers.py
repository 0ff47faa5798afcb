"""Protocol v1 ops → replies, and scheduler events → stream messages. No sockets here.

``Handlers.handle(identity, frames)`` answers one incoming message with the reply map to send (None
for an accepted ``say``: its messages come from scheduler events through ``message_for``). It never
lets an exception escape: protocol problems become their error code, and anything unexpected is
logged and answered with ``internal`` while the server keeps running (llama.cpp's rule: the handler
never throws). Not thread-safe: the engine loop owns it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import __version__, protocol
from .errors import ConfigError, PromptError
from .generator import LanguageModel
from .grounding import Grounding
from .memory_ops import MemoryOps
from .npcs import NpcRegistry, PromptBuilder, persona_to_dict
from .persona import Persona
from .protocol import ErrorCode, Op, ProtocolError
from .request import DoneEvent, ErrorEvent, Event, Request, RequestKey, TokenEvent
from .rerank import MAX_SEED, candidate_options, score_candidates
from .sampling import SearchOptions
from .scheduler import Scheduler
from .steering import FactSteering
from .store import Exchange, MemoryStore

if TYPE_CHECKING:
    from .server import ServerConfig

log = logging.getLogger(__name__)

Reply = dict[str, Any]


@dataclass(frozen=True)
class SayMeta:
    """What the server remembers about a ``say`` to record the exchange when it finishes."""

    npc: str
    player: str
    line: str


class Handlers:
    """Every op of protocol v1 for one model, NPC registry, dialogue memory and scheduler."""

    def __init__(self, model: LanguageModel, scheduler: Scheduler, config: ServerConfig, registry: NpcRegistry,
                 memory: MemoryStore, clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.scheduler = scheduler
        self.config = config
        self.registry = registry
        self.memory = memory
        self.clock = clock
        # Whether a say stream is still held (running, queued, or its end waiting to be sent); the server
        # widens it to its delivery queue. ``ping`` answers with the asked-for streams that are not.
        self.holds: Callable[[RequestKey], bool] = scheduler.has_live
        self.accepting = True  # False while the server drains for shutdown: new says get busy
        self.started_at = clock()
        self.prompts = PromptBuilder(model.manifest, model.tokenizer)
        self._eos = frozenset(model.manifest.eos_token_ids)
        self._restore_npcs()
        # Server-wide counters reported by stats (the server adds clients it had to drop).
        self.counters = {"requests": 0, "rejected": 0, "busy": 0, "internal_errors": 0, "clients_dropped": 0}
        self._ops: dict[Op, Callable[[bytes, protocol.Request], Reply | None]] = {
            Op.HELLO: self._hello, Op.PING: self._ping, Op.NPC_UPSERT: self._npc_upsert, Op.NPC_GET: self._npc_get,
            Op.NPC_LIST: self._npc_list, Op.SAY: self._say, Op.CANCEL: self._cancel, Op.STATS: self._stats,
            **MemoryOps(memory).ops(),
        }

    def handle(self, identity: bytes, frames: Sequence[bytes]) -> Reply | None:
        """The reply to one message (``frames`` after the routing identity), or None for a started say."""
        self.counters["requests"] += 1
        request: protocol.Request | None = None
        try:
            if len(frames) != 1:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"A message must be exactly one frame holding one msgpack "
                                    f"map; this one has {len(frames)} frames.")
            request = protocol.parse_request(frames[0])
            return self._ops[request.op](identity, request)
        except ProtocolError as exc:
            self.counters["rejected"] += 1
            self.counters["busy"] += exc.code is ErrorCode.BUSY
            seq = 0 if request is not None and request.op is Op.SAY else None  # a say's error is its terminal message
            return protocol.error(exc.request_id or (request.id if request else None), exc.code, exc.message, seq=seq)
        except Exception as exc:  # a bug in the server: answer, log, keep serving
            self.counters["internal_errors"] += 1
            log.exception("Handling a %s request failed.", request.op.value if request else "malformed")
            return protocol.error(request.id if request else None, ErrorCode.INTERNAL,
                                  f"The server failed on this request ({type(exc).__name__}); the error is in its log.",
                                  seq=0 if request is not None and request.op is Op.SAY else None)

    def _restore_npcs(self) -> None:
        """Personas games gave through ``npc.upsert`` before a restart (or a crash), over the built-in and
        folder ones. One that no longer validates is skipped with a warning, never a failed start."""
        restored = 0
        for npc, data in self.memory.npcs().items():
            try:
                self.registry.upsert(npc, Persona.from_dict(data, source=f"saved persona of NPC {npc!r}"))
                restored += 1
            except PromptError as exc:
                log.warning("Not restoring NPC %r from the memory database: %s", npc, exc)
        if restored:
            log.info("Restored %d NPC persona(s) given by npc.upsert before this start.", restored)

    # --- ops ------------------------------------------------------------------------------------------

    def _hello(self, identity: bytes, request: protocol.Request) -> Reply:
        m = self.model.manifest
        return protocol.ok(
            request.id, server="npctalk", version=__version__, protocol=protocol.PROTOCOL_VERSION,
            model={"name": m.name, "architecture": m.architecture, "dialogue_format": m.dialogue_format,
                   "max_context": m.max_context, "provider": getattr(self.model, "provider", "cpu"), "dtype": m.dtype,
                   "threads": getattr(self.model, "intra_op_threads", None), "spin": getattr(self.model, "spin", True),
                   "inplace_kv": getattr(self.model, "inplace_kv", False)},
            capabilities={"ops": [op.value for op in Op], "batching": self.scheduler.batched,
                          "max_batch": self.scheduler.config.max_batch, "max_queue": self.scheduler.config.max_queue,
                          "max_new_tokens": self.config.max_new_tokens, "max_request_bytes": protocol.MAX_REQUEST_BYTES,
                          "request_timeout_ms": int(self.config.request_timeout_s * 1000),
                          "client_timeout_ms": int(self.config.client_timeout_s * 1000)},
        )

    def _ping(self, identity: bytes, request: protocol.Request) -> Reply:
        params = request.params
        assert isinstance(params, protocol.Ping)
        if not params.streams:
            return protocol.ok(request.id)
        return protocol.ok(request.id, unknown=[s for s in params.streams if not self.holds(RequestKey(identity, s))])

    def _npc_upsert(self, identity: bytes, request: protocol.Request) -> Reply:
        params = request.params
        assert isinstance(params, protocol.NpcUpsert)
        try:
            persona = Persona.from_dict(params.persona, source=f"persona of NPC {params.npc!r}")
        except PromptError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from None
        try:
            # The persona must leave room for a line and a reply, or every say to this NPC would fail.
            self.prompts.build(persona, [], "Hello.", {}, self._options(protocol.Say(params.npc, "Hello."), persona)
                               .max_new_tokens)
            old = self.registry.get(params.npc)
            created = self.registry.upsert(params.npc, persona)
        except PromptError as exc:
            raise ProtocolError(ErrorCode.TOO_LARGE, str(exc)) from None
        try:
            self.memory.save_npc(params.npc, persona.to_dict())  # on disk before ok: a restart keeps the NPC
        except Exception:
            self.registry.restore(params.npc, old)  # all or nothing: the server keeps what the disk has
            raise
        if old is not None and old != persona:
            # Memories stay: they are saved across restarts, and a game that restyles a built-in NPC at
            # every start must not wipe them each time. memory.clear starts an NPC over.
            self.scheduler.prefix_cache.invalidate(params.npc)  # its persona prefix KV is stale
        return protocol.ok(request.id, npc=params.npc, created=created)

    def _npc_get(self, identity: bytes, request: protocol.Request) -> Reply:
        params = request.params
        assert isinstance(params, protocol.NpcRef)
        return protocol.ok(request.id, npc=params.npc, persona=persona_to_dict(self._persona(params.npc)))

    def _npc_list(self, identity: bytes, request: protocol.Request) -> Reply:
        npcs = [{"npc": npc, "name": p.name, "role": p.role} for npc, p in self.registry.items()]
        return protocol.ok(request.id, npcs=npcs)

    def _say(self, identity: bytes, request: protocol.Request) -> None:
        params = request.params
        assert isinstance(params, protocol.Say)
        if not self.accepting:
            raise ProtocolError(ErrorCode.BUSY, "The server is shutting down and takes no new say requests.")
        persona = self._persona(params.npc)
        key = RequestKey(identity, request.id)
        if self.scheduler.has_live(key):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"Request id {request.id!r} is still streaming; use a new id.")
        options = self._options(params, persona)
        try:
            recall = self.memory.recall(params.npc, params.player, params.text, params.context)
            history, memory_notes = self.memory.history(params.npc, params.player), recall.notes()
            prefix = self.prompts.persona_prefix(persona, params.player)  # its KV is shared between turns
            prompt = self.prompts.build(persona, history, params.text, params.context, options.max_new_tokens,
                                        player=params.player, notes=memory_notes, persona_prefix=prefix)
        except PromptError as exc:
            raise ProtocolError(ErrorCode.TOO_LARGE, str(exc)) from None
        grounding = None
        if persona.rerank.enabled or options.fact_bias > 0:
            grounding = Grounding.build(  # what the NPC was given this turn (engine/grounding.py)
                persona, params.text, player_lines=[t.text for t in history if t.role == "user"],
                memory=[note for _, note in memory_notes], player=params.player,
                context=[note for _, note in self.prompts.notes(persona, history, params.text, params.context,
                                                                 params.player)])
        steering = None if grounding is None else FactSteering.build(grounding, self.model.tokenizer, options.fact_bias)
        now = self.clock()
        manifest = self.model.manifest
        say = Request(key, prompt, options, self.model.tokenizer, self._eos, manifest.max_context, received_at=now,
                      deadline=now + self._timeout_s(params), meta=SayMeta(params.npc, params.player, params.text),
                      steering=steering)
        cached = len(prefix)  # the prompt opens with it (PromptBuilder.build)
        if persona.rerank.enabled:  # N sampled candidates decode; the best is sent once chosen (PROTOCOL.md)
            seed = params.seed if params.seed is not None else random.randrange(MAX_SEED)
            candidates = [dataclasses.replace(say, key=RequestKey(identity, f"{request.id}\x00candidate{i}"),
                                              options=o, meta=None)
                          for i, o in enumerate(candidate_options(options, persona.rerank, seed))]
            scorer = functools.partial(score_candidates, self.model, self.prompts.formatter, persona=persona,
                                       config=persona.rerank, grounding=grounding)
            submitted = self.scheduler.submit_reranked(say, candidates, scorer, (params.npc, cached))
        else:
            submitted = self.scheduler.submit(say, (params.npc, cached))
        if not submitted:
            cap = self.scheduler.config
            raise ProtocolError(ErrorCode.BUSY, f"The server is at capacity ({cap.max_batch} streams running, "
                                f"{cap.max_queue} waiting); retry later.")
        return None

    def _cancel(self, identity: bytes, request: protocol.Request) -> Reply:
        params = request.params
        assert isinstance(params, protocol.Cancel)
        found = self.scheduler.cancel(RequestKey(identity, params.target))
        return protocol.ok(request.id, target=params.target, found=found)

    def _stats(self, identity: bytes, request: protocol.Request) -> Reply:
        return protocol.ok(request.id, **self.scheduler.stats(), uptime_s=round(self.clock() - self.started_at, 3),
                           npcs=len(self.registry), conversations=self.memory.pair_count(), accepting=self.accepting,
                           **self.counters)

    # --- helpers --------------------------------------------------------------------------------------

    def _persona(self, npc: str) -> Persona:
        persona = self.registry.get(npc)
        if persona is None:
            raise ProtocolError(ErrorCode.UNKNOWN_NPC, f"No NPC {npc[:64]!r}; register it with npc.upsert "
                                f"(npc.list shows the {len(self.registry)} known).")
        return persona

    def _timeout_s(self, params: protocol.Say) -> float:
        """Seconds from receipt to done: the say's ``deadline_ms`` when given, never past the server's limit."""
        limit = self.config.request_timeout_s
        return limit if params.deadline_ms is None else min(limit, params.deadline_ms / 1000)

    def _options(self, params: protocol.Say, persona: Persona) -> SearchOptions:
        """The say's search options: server defaults, then the persona's ``sampling``, then the say's fields."""
        limit = self.config.max_new_tokens
        if params.max_new_tokens is not None and params.max_new_tokens > limit:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"'max_new_tokens' is {params.max_new_tokens}; this server "
                                f"allows at most {limit}.")
        changes: dict[str, Any] = {"max_new_tokens": params.max_new_tokens or min(self.config.defaults.max_new_tokens, limit)}
        if params.temperature is not None:
            changes.update(temperature=params.temperature, do_sample=params.temperature > 0)
        for name in ("top_p", "top_k", "seed"):
            if getattr(params, name) is not None:
                changes[name] = getattr(params, name)
        try:
            return dataclasses.replace(persona.sampling.apply(self.config.defaults), **changes)
        except ConfigError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from None

    # --- scheduler events → stream messages -----------------------------------------------------------

    def message_for(self, event: Event) -> Reply:
        """The protocol message of one scheduler event; a finished exchange is remembered."""
        return self.messages_for([event])[0]

    def messages_for(self, events: Sequence[Event]) -> list[Reply]:
        """The protocol messages of one engine step's events, in order. The exchanges they finish are
        remembered first, with one commit for all (``MemoryStore.record_many``): each is on disk
        before its ``done`` is made, and one that cannot be saved becomes an ``internal`` error."""
        done = [(e, x) for e in events if (x := self._exchange(e)) is not None]
        saved = self._record(done)
        return [self._message(e, saved.get(id(e))) for e in events]

    @staticmethod
    def _exchange(event: Event) -> Exchange | None:
        """The exchange a ``done`` event finishes, when it is one to remember (a say's, not cancelled, not empty)."""
        request, meta = event.request, event.request.meta
        if (not isinstance(event, DoneEvent) or not isinstance(meta, SayMeta)
                or request.finish_reason in (None, "cancelled") or not request.text.strip()):
            return None
        return Exchange(meta.npc, meta.player, meta.line, request.text)

    def _record(self, done: Sequence[tuple[Event, Exchange]]) -> dict[int, Exception | None]:
        """Remember the ``done`` exchanges; per event (by id) the error that kept it out, or None."""
        if not done:
            return {}
        try:
            results: list[int | Exception] = self.memory.record_many([x for _, x in done])
        except Exception as exc:  # the commit itself failed: none of them is saved
            results = [exc] * len(done)
        return {id(e): r if isinstance(r, Exception) else None for (e, _), r in zip(done, results)}

    def _message(self, event: Event, failure: Exception | None) -> Reply:
        request = event.request
        if isinstance(event, TokenEvent):
            return protocol.token(request.key.id, event.seq, event.text)
        if isinstance(event, ErrorEvent):
            return protocol.error(request.key.id, event.code, event.message, seq=event.seq)
        assert isinstance(event, DoneEvent) and request.finish_reason is not None
        if failure is not None:
            log.error("Saving the exchange of request %r failed.", request.key.id, exc_info=failure)
            self.counters["internal_errors"] += 1
            return protocol.error(request.key.id, ErrorCode.INTERNAL, "The reply could not be saved to the "
                                  "memory database (the error is in the server's log); it is not remembered.",
                                  seq=event.seq)
        timings = request.timings_ms()
        return protocol.done(
            request.key.id, event.seq, request.text, request.finish_reason, prompt_tokens=request.prompt_tokens,
            completion_tokens=request.completion_tokens, queue_ms=timings["queue_ms"] or 0.0,
            ttft_ms=timings["ttft_ms"], total_ms=timings["total_ms"] or 0.0,
        )
