"""Continuous batching: requests join and leave the decode batch between steps.

One ``step()`` does, in order::

    1. reap     cancelled requests end with finish_reason "cancelled", expired ones with a timeout error
    2. prefill  queued requests are prefilled in arrival order (a short one may overtake a long
                prefill in progress: ``_overtake``). Where the model reads several new prompts in
                one call (``forward_many``: the slot decoder), the queue's first whole prompts that
                fit in the step's budget go together (``_prefill_together``); otherwise each goes
                in its own single-row cache
                (``prefill.Prefill``), at most ``prefill_chunk`` prompt tokens per step: a long
                prompt takes several steps, and the streams already decoding get a token after
                every chunk instead of stalling for the whole prompt. A request whose prompt is in
                samples its first token and joins the batch. A request submitted with a persona
                prefix starts from the prefix cache's KV snapshot (``prefix_cache``) and prefills
                only the rest; on a miss the prefix is prefilled first and stored (read whole in a
                group, its snapshot is taken from the slot's first positions afterwards); a
                request whose prefix is cached is never grouped: it reads only its turn, alone
    3. decode   one decode step for every row (``_launch``: (B, 1) → argmax tokens, each row's top
                logits, or logits (B, vocab)); each row takes its next token from it
                (``Request.take``; rows whose reply ends with it by EOS or length leave the batch),
                and the taken tokens become text and events (``Request.book``: detokenization,
                stop strings); finished rows leave

and returns the events (token / done / error) the step produced, in order. A request is cancelled
within one step of ``cancel``. The queue is bounded: ``submit`` refuses at once when it is full, so
the caller answers ``busy`` instead of letting latency grow without limit.

With ``decode_ahead`` (``serve --decode-ahead``) the order changes so that host work overlaps the
model (``decode_step``): a call first joins the step the previous call launched on a worker thread
and takes its tokens (rows whose reply ends with one, by EOS or length, leave the batch), then
reaps, prefills, launches the next step and books the taken tokens while it runs. A reply that
ends on a stop string (found when booking) has one extra step run, dropped at the next join. Every
other run of the model (prompt reads, reranking's scoring) is handed to that worker too and waited for
(``decode_step.OnWorker``): ONNX Runtime lets a session that replays CUDA graphs run on one thread only.

Reranked says (``submit_reranked``): the client's request never decodes itself; its N candidate
requests (same prompt, different seeds) do, batched like any others, and their messages are
swallowed. When the last candidate ends, the scorer picks one and the client's request sends the
chosen text as one token message, then ``done`` (cancel and deadline act on the client's request
and end its candidates). Scoring runs inside the step (N prefills and a few batched forwards).

A request being prefilled counts as active (``stats``: ``prefilling``) and holds a batch slot;
``cancel`` and its deadline end it between two chunks, and its partial cache is dropped.

When the graph cannot mask padding (``batch.supports_padding``), every stream keeps its own
single-row batch and is stepped alone; that is slower but exact, and logged once at start.

Not thread-safe: one engine loop calls ``submit``, ``cancel`` and ``step``. ``clock`` is injectable so
tests drive deadlines without sleeping.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from .batch import DecodeBatch, close_cache, new_batch, supports_padding
from .decode_step import DecodeSteps, OnWorker, Flight, StepOutput
from .errors import ServeError
from .generator import LanguageModel
from .kv_cache import KVCache
from .prefill import Prefill, group_together, read_together
from .prefix_cache import PrefixCache, Snapshots
from .protocol import ErrorCode
from .request import Event, FinishReason, Request, RequestKey, RequestState
from .reranked import RerankedSays, Scorer
from .scheduler_config import SchedulerConfig

log = logging.getLogger(__name__)

THROUGHPUT_WINDOW_S = 5.0  # tokens/s in stats is measured over this many recent seconds

class Scheduler:
    """Queue + decode batch for one model."""

    def __init__(self, model: LanguageModel, config: SchedulerConfig = SchedulerConfig(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.config = config
        self.clock = clock
        self.batched = supports_padding(model)
        if not self.batched:
            log.warning("The model graph takes no attention_mask/position_ids, so streams cannot share a padded "
                        "batch; each active stream is stepped on its own (slower). Re-export the bundle to batch.")
        self._queue: deque[Request] = deque()
        self._prefilling: deque[Prefill] = deque()  # admitted, prompt partly in its cache; the first one runs
        self._groups: list[DecodeBatch[Request]] = []  # one group when batched, one per stream otherwise
        self._live: dict[RequestKey, Request] = {}
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes, model if isinstance(model, Snapshots) else None)
        self._prefixes: dict[RequestKey, tuple[str, int]] = {}  # live request → (NPC id, persona prefix length)
        self._reranked = RerankedSays()
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step, for tokens/s
        self._started = clock()
        self._step_tokens = 0  # tokens sampled in the current step (prefill first tokens included)
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "tokens": 0, "steps": 0, "prefilled_together": 0}
        self._steps = DecodeSteps(ahead=config.decode_ahead, top_tokens=config.top_tokens)
        if config.decode_ahead:  # every run of the model on the decode worker (decode_step.OnWorker)
            self.model = OnWorker(model, self._steps)  # type: ignore[assignment]

    # --- intake ----------------------------------------------------------------------------------------

    def submit(self, request: Request, prefix: tuple[str, int] | None = None) -> bool:
        """Queue ``request``; False (nothing queued) when ``max_batch + max_queue`` requests are live.

        ``prefix`` = (NPC id, n): the first ``n`` prompt ids are that NPC's persona prefix, whose KV
        the prefix cache may share (0 < n < prompt length; otherwise ignored). The caller checks
        ``has_live`` first: a key already live is a bug and raises ``ServeError``.
        """
        if request.key in self._live:
            raise ServeError(f"Request {request.key.id!r} of this client is already live; ids must be unique.")
        if len(self._live) >= self.config.max_batch + self.config.max_queue:
            return False
        self._queue.append(request)
        self._live[request.key] = request
        if prefix is not None and 0 < prefix[1] < request.prompt_tokens and self.prefix_cache.enabled:
            self._prefixes[request.key] = prefix
        return True

    def submit_reranked(self, request: Request, candidates: list[Request], scorer: Scorer,
                        prefix: tuple[str, int] | None = None) -> bool:
        """Queue ``candidates`` (their own keys, the client's identity) to answer ``request``, which is
        answered with the candidate ``scorer`` rates best; False when they do not all fit."""
        keys = [request.key, *(c.key for c in candidates)]
        if any(key in self._live for key in keys) or len(set(keys)) != len(keys):
            raise ServeError(f"Request {request.key.id!r} or one of its candidates is already live; ids must be unique.")
        if not candidates or len(self._live) + 1 + len(candidates) > self.config.max_batch + self.config.max_queue:
            return False  # the say is live itself, and every candidate must fit: none is dropped on the way
        self._live[request.key] = request
        self._reranked.add(request, candidates, self._steps.on_worker(scorer))  # scoring runs the model
        for child in candidates:
            self.submit(child, prefix)
        return True

    def has_live(self, key: RequestKey) -> bool:
        return key in self._live

    def cancel(self, key: RequestKey) -> bool:
        """Ask ``key``'s request to end with "cancelled" at the next step; False if it is not live."""
        request = self._live.get(key)
        if request is None:
            return False
        request.cancel_requested = True
        return True

    def cancel_client(self, client: bytes) -> int:
        """Cancel every live request of one client (it vanished or stopped reading); returns how many
        were not already being cancelled."""
        newly = [r for key, r in self._live.items() if key.client == client and not r.cancel_requested]
        for request in newly:
            request.cancel_requested = True
        return len(newly)

    def cancel_all(self) -> int:
        for request in self._live.values():
            request.cancel_requested = True
        return len(self._live)

    def live_clients(self) -> set[bytes]:
        """Identities of the clients with a queued or running request."""
        return {key.client for key in self._live}

    def abort_all(self, message: str) -> list[Event]:
        """Fail every live request with ``internal`` and empty the batch (after an unexpected error)."""
        self._steps.join()  # the step in flight ends before its rows go
        now, events = self.clock(), list[Event]()
        for request in list(self._live.values()):
            if request.live:
                events.append(request.fail(ErrorCode.INTERNAL, message, now))
            self._retire(request)
        events = self._reranked.visible(events)
        self._live.clear()
        self._prefixes.clear()
        self._reranked.clear()
        self._queue.clear()
        for prefill in self._prefilling:
            close_cache(prefill.cache)
        self._prefilling.clear()
        for group in self._groups:
            group.remove(set(group.rows))
        self._groups = []
        return events

    # --- the step ----------------------------------------------------------------------------------------

    def step(self, emit: Callable[[list[Event]], None] | None = None) -> list[Event]:
        """Reap, admit, decode once; the events in the order they happened.

        Decode is split around the model: a step is launched for every row, each row takes its next
        token from it (``Request.take``), and the taken tokens become text and events
        (``Request.book``). Plainly, the step runs and is joined at once, after prefill; given
        ``emit``, the events before it (reaped requests, the first tokens of the prompts just read)
        go to ``emit`` before the decode step runs, so a reply's first token does not wait for the
        other streams' step, and only the rest are returned. With ``decode_ahead`` the step is
        launched on a worker thread at the end of the call and joined at the start of the next, and
        the tokens taken from the previous step are booked while it runs (and while the server sends
        them); ``emit`` is not used then (the launch comes first)."""
        events: list[Event] = []
        self._step_tokens = 0
        ahead = self._steps.ahead
        outputs = self._steps.join()  # with decode_ahead, the step the last call launched
        self._reap(self.clock(), events)
        taken = self._take(outputs, events)
        self._admit(events)
        if ahead:
            events = self._reranked.settle(events, self.clock(), self._retire)  # scoring runs the model: before the launch
            self._steps.launch(self._groups, self.model.manifest.vocab_size)
            booked: list[Event] = []
            for request, _ in taken:
                self._took(request, request.book(), booked)
            events += self._reranked.visible(booked)
        else:
            if emit is not None and events:
                emit(self._reranked.settle(events, self.clock(), self._retire))
                events = []
            self._steps.launch(self._groups, self.model.manifest.vocab_size)
            for request, _ in self._take(self._steps.join(), events):
                self._took(request, request.book(), events)
            events = self._reranked.settle(events, self.clock(), self._retire)
        now = self.clock()
        self.counters["steps"] += 1
        self.counters["tokens"] += self._step_tokens
        self._recent.append((now, self._step_tokens))
        while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()
        return events

    @property
    def has_work(self) -> bool:
        return bool(self._live)

    def _reap(self, now: float, events: list[Event]) -> None:
        for request in [r for r in self._live.values() if r.cancel_requested or now >= r.deadline]:
            if request.cancel_requested:
                events.append(request.finish("cancelled", now))
            else:
                waited = (now - request.received_at)
                events.append(request.fail(ErrorCode.TIMEOUT, f"The request passed its deadline after {waited:.2f} s "
                                           f"({request.completion_tokens} tokens generated).", now))
            self._retire(request)
        # Terminal requests leave the queue, their unfinished prefill (its cache is dropped) and their batch rows.
        self._queue = deque(r for r in self._queue if r.live)
        for prefill in self._prefilling:
            if not prefill.request.live:
                close_cache(prefill.cache)
        self._prefilling = deque(p for p in self._prefilling if p.request.live)
        self._drop_rows({row for group in self._groups for row in group.rows if not row.live})

    def _admit(self, events: list[Event]) -> None:
        """Prefill this step's share of prompts; requests whose prompt is in join the batch."""
        chunk = self.config.prefill_chunk
        budget = chunk or self.config.prefill_tokens
        joiners: list[tuple[Request, KVCache]] = []
        if chunk:
            self._overtake(chunk)
        while budget > 0:
            if not self._prefilling:
                if not self._queue or self.active_count + len(joiners) >= self.config.max_batch:
                    break
                ran_some = budget < self.config.prefill_tokens
                if not chunk and ran_some and self._prefill_cost(self._queue[0]) > budget:
                    break  # whole prompts: the next step runs it; decoding streams get their token now
                ran = self._prefill_together(budget, joiners, events)
                if ran:
                    budget -= ran
                    continue
                self._start(self._queue.popleft())
            prefill = self._prefilling[0]
            request = prefill.request
            try:
                # Whole prompts (chunk 0) run all that is left; chunks at most the step's remaining budget.
                logits, ran = prefill.advance(self.model, budget if chunk else prefill.remaining, self.prefix_cache)
            except Exception as exc:  # any failure of one prompt fails that request, not the server
                log.exception("Prefill of request %r failed.", request.key.id)
                close_cache(self._prefilling.popleft().cache)
                self._fail(request, ErrorCode.INTERNAL, f"The engine failed while reading the prompt: {exc}.", events)
                continue
            budget -= ran
            if logits is None:
                break  # the budget is spent; the rest of this prompt runs next step
            self._prefilling.popleft()
            if self._sample(request, logits, events):
                joiners.append((request, prefill.cache))  # cache (1, kv_heads, prompt, head_dim)
            else:
                close_cache(prefill.cache)  # the reply ended at its first token
        if not joiners:
            return
        for request, _ in joiners:
            request.advance(RequestState.DECODING)
        if self.batched:
            if not self._groups:
                self._groups.append(new_batch(self.model))
            self._groups[0].add(joiners)
        else:
            for joiner in joiners:
                group: DecodeBatch[Request] = new_batch(self.model)
                group.add([joiner])
                self._groups.append(group)

    def _prefill_together(self, budget: int, joiners: list[tuple[Request, KVCache]], events: list[Event]) -> int:
        """Prefill the queue's first requests in one call when at least two whole prompts fit in
        ``budget`` (``prefill.group_together``; a model with ``forward_many``: the slot decoder);
        returns the prompt tokens run, 0 when it did nothing. A failure fails the group, not the server."""
        if not hasattr(self.model, "forward_many"):
            return 0
        room = self.config.max_batch - self.active_count - len(joiners)
        cached = (lambda request: False) if self.config.group_cached else self._has_cached_prefix
        group = group_together(self._queue, budget, room, cached)
        if len(group) < 2:
            return 0
        prefills = []
        for request in group:
            self._queue.popleft()  # the group is the queue's head, in order
            prefills.append(self._begin(request, whole=True))
        cost = sum(request.prompt_tokens for request in group)
        try:
            logits = read_together(self.model, prefills, self.prefix_cache)
        except Exception as exc:  # as for one prompt: these requests fail, the server goes on
            log.exception("Prefill of %d requests together failed.", len(prefills))
            for prefill in prefills:
                close_cache(prefill.cache)
                self._fail(prefill.request, ErrorCode.INTERNAL, f"The engine failed while reading the prompt: {exc}.", events)
            return cost
        self.counters["prefilled_together"] += len(prefills)
        for prefill, row in zip(prefills, logits):
            if self._sample(prefill.request, row[None], events):
                joiners.append((prefill.request, prefill.cache))  # the slot holds the whole prompt
            else:
                close_cache(prefill.cache)  # the reply ended at its first token
        return cost

    def _overtake(self, budget: int) -> None:
        """Let one queued prompt that fits in half a step's budget run before a long prefill in progress.

        A player's line to an NPC whose persona prefix is cached costs a few dozen tokens; without
        this it would wait for every chunk of another NPC's cold 400-token persona first. At most one
        per step and at most half the budget, so the long prefill keeps at least half its pace.
        """
        if not self._prefilling or not self._queue or self.active_count >= self.config.max_batch:
            return
        if self._prefilling[0].remaining <= budget:
            return  # the prefill in progress finishes this step anyway
        for index, request in enumerate(self._queue):
            if self._prefill_cost(request) <= budget // 2:
                del self._queue[index]
                self._start(request)            # appended last ...
                self._prefilling.rotate(1)      # ... and moved to the front: it runs first this step
                return

    def _start(self, request: Request) -> None:
        """Queued → prefilling, from the persona prefix's snapshot when the prefix cache holds it."""
        self._prefilling.append(self._begin(request))

    def _begin(self, request: Request, whole: bool = False) -> Prefill:
        """``request``'s prefill, admitted now (its state and admission time set); ``whole``: its
        prompt is read from the start even when its persona prefix is cached (a group's read)."""
        request.advance(RequestState.PREFILLING)
        request.admitted_at = self.clock()
        key = self._prefix_key(request)
        self._prefixes.pop(request.key, None)
        if whole and key is not None and key in self.prefix_cache:
            key = None  # cached already: nothing to store, and the slot starts empty
        return Prefill.start(request, self.model, self.prefix_cache, key)

    def _prefix_key(self, request: Request) -> tuple[str, tuple[int, ...]] | None:
        hint = self._prefixes.get(request.key)
        return None if hint is None else PrefixCache.key(hint[0], request.prompt_ids[:hint[1]])

    def _has_cached_prefix(self, request: Request) -> bool:
        return self._prefill_cost(request) < request.prompt_tokens  # a hint's prefix is never empty

    def _prefill_cost(self, request: Request) -> int:
        """Prompt tokens ``request``'s prefill will run (its cached prefix not counted)."""
        key = self._prefix_key(request)
        return request.prompt_tokens - (len(key[1]) if key is not None and key in self.prefix_cache else 0)

    def _take(self, outputs: list[tuple[Flight, StepOutput | Exception]], events: list[Event]) -> list[tuple[Request, bool]]:
        """Each live row's next token from its step's output, taken (not yet text): (request, reply
        ends with it) per row. A failed step fails its rows; the server and other groups go on."""
        taken: list[tuple[Request, bool]] = []
        failed: set[Request] = set()
        for flight, out in outputs:
            if isinstance(out, Exception):
                log.error("Decode step for %d streams failed.", len(flight.rows), exc_info=out)
                for request in flight.rows:
                    if request.live:
                        self._fail(request, ErrorCode.INTERNAL, f"The engine failed while generating: {out}.", events)
                failed.update(flight.rows)
                continue
            # A row not live has ended since the step was launched (cancelled, timed out, a stop string).
            live = [request.live for request in flight.rows]
            for request, token in zip(flight.rows, self._steps.choose(flight, out, live)):
                if token is not None:
                    taken.append((request, request.take(token, self.clock())))
        # Failed rows and replies ending with their token (EOS, length) take no further step.
        self._drop_rows(failed | {request for request, ending in taken if ending})
        return taken

    def _sample(self, request: Request, logits: np.ndarray, events: list[Event]) -> bool:
        """Sample ``request``'s next token from (1, vocab) logits; False when its reply has ended."""
        return self._took(request, request.choose(logits, self.clock()), events)

    def _took(self, request: Request, outcome: tuple[list[Event], FinishReason | None], events: list[Event]) -> bool:
        """Book a chosen token's events; finish the request when its reply ended (then False)."""
        new_events, reason = outcome
        self._step_tokens += 1
        events.extend(new_events)
        if reason is None:
            return True
        events.append(request.finish(reason, self.clock()))
        self._retire(request)
        return False

    def _fail(self, request: Request, code: ErrorCode, message: str, events: list[Event]) -> None:
        events.append(request.fail(code, message, self.clock()))
        self._retire(request)

    def _retire(self, request: Request) -> None:
        self._live.pop(request.key, None)
        self._prefixes.pop(request.key, None)
        if self._reranked.is_candidate(request):
            return  # candidates are internal: the say they answer is what counts
        outcome = "failed" if request.state is RequestState.FAILED else (
            "cancelled" if request.finish_reason == "cancelled" else "completed")
        self.counters[outcome] += 1

    def _drop_rows(self, gone: Iterable[Request]) -> None:
        gone = set(gone)
        if not gone:
            return
        for group in self._groups:
            group.remove(gone)
        self._groups = [g for g in self._groups if len(g)]

    # --- observation -------------------------------------------------------------------------------------

    @property
    def active_count(self) -> int:
        """Streams holding a batch slot: decoding, or being prefilled to join."""
        return sum(len(g) for g in self._groups) + len(self._prefilling)

    @property
    def prefilling_count(self) -> int:
        return len(self._prefilling)

    @property
    def queued_count(self) -> int:
        return len(self._queue)

    def tokens_per_second(self) -> float:
        """Tokens sampled per second over the last ``THROUGHPUT_WINDOW_S`` seconds."""
        now = self.clock()
        window = min(THROUGHPUT_WINDOW_S, max(now - self._started, 1e-3))
        return sum(n for t, n in self._recent if t >= now - window) / window

    def stats(self) -> dict[str, Any]:
        return {
            "active": self.active_count, "prefilling": self.prefilling_count, "queued": self.queued_count,
            "max_batch": self.config.max_batch, "max_queue": self.config.max_queue, "batched": self.batched,
            "prefill_chunk": self.config.prefill_chunk, "group_cached": self.config.group_cached,
            "tokens_per_s": round(self.tokens_per_second(), 1), **self.counters, "sampled": dict(self._steps.sampled),
            "prefix_cache": self.prefix_cache.stats(),
        }
