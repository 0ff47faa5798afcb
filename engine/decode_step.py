"""One decode step over the scheduler's batches: launched, joined, and each row's next token chosen.

A step runs one forward for every row of every batch (``DecodeBatch`` or ``SlotBatch``) and gives
back, per batch, the cheapest thing its rows need:

- every row's next token is the plain argmax (``Request.needs_logits`` False): the argmax tokens,
  computed where the logits are (``forward_greedy``; only 8 bytes a row leave a GPU);
- some row samples, has penalties or a steering bonus: each row's top logits (``forward_top``,
  ``topk.TopTokens``) when the vocabulary is large (over ``topk.MIN_VOCAB``), else the logits
  (rows, vocab); the plain rows of such a batch still take the device's argmax.

``DecodeSteps.choose`` then gives each row its token: the argmax, a pick from its top candidates
(all such rows of the step together, ``request.pick_from_many``), or ``Request.pick`` from its
whole row when the candidates cannot decide (the same token either way; ``sampled`` counts which).

Plainly, ``launch`` runs the step at once and ``join`` hands over its result. With ``ahead``
(``serve --decode-ahead``) ``launch`` submits it to a worker thread and returns, so the engine loop
books the last step's tokens, and the server sends them, while it runs; ``join`` waits for it.
Nothing may touch the model or the batches between a ``launch`` and the next ``join`` (the
scheduler keeps to that), so the worker needs no locks. ONNX Runtime lets a session that replays CUDA
graphs be run from one thread only, so with ``ahead`` every other run of the model (prompts read,
candidates scored) goes to the worker too (``on_worker``, ``OnWorker``): the engine loop hands it over
and waits. On the 2-core CPU VM the thread hand-offs cost more than the overlap saves (tiny model,
one stream: 0.30–0.36 → 0.64–0.83 ms per token through the socket), so it is off by default; on a GPU
the step is device time the host could use (not measured there yet; at the H100's pace,
``bench/paced.py``, +15-25 % at 32-64 streams).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import topk
from .request import Request, pick_from_many
from .topk import TopTokens


WORKER_NAME = "npctalk-decode"  # the decode worker thread's name prefix


class OnWorker:
    """``model`` with every method run through ``steps.on_worker``: the scheduler's view of its model
    with decode-ahead, so prompt reads run on the thread that runs the decode steps. Attributes that
    are not methods (manifest, decoder, ...) are the model's own."""

    def __init__(self, model: Any, steps: DecodeSteps) -> None:
        self._model, self._steps = model, steps

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._model, name)
        return self._steps.on_worker(attr) if callable(attr) and not isinstance(attr, type) else attr


@dataclass
class StepOutput:
    """What a decode step gives back: argmax tokens (rows,), top candidates, or logits (rows, vocab)."""

    tokens: np.ndarray | None = None
    best: TopTokens | None = None
    logits: np.ndarray | None = None


@dataclass
class Flight:
    """A decode step launched for ``rows`` (``needs``: which of them need more than the argmax)."""

    rows: list[Request]
    needs: list[bool]
    result: Future[StepOutput]


class DecodeSteps:
    """Launches and joins the decode steps of one scheduler; ``top_tokens``: candidates per row for
    rows that need more than the argmax (0: whole logits rows). Not thread-safe: the engine loop
    calls it (the worker only runs the steps)."""

    def __init__(self, *, ahead: bool, top_tokens: int) -> None:
        self.top_tokens = top_tokens
        self._thread: threading.Thread | None = None  # the worker's thread, once it runs
        self._worker = (ThreadPoolExecutor(max_workers=1, thread_name_prefix=WORKER_NAME, initializer=self._started)
                        if ahead else None)
        self._flights: list[Flight] = []  # launched, not yet joined
        # Sampled tokens of decode steps: picked from the top candidates, or from the whole logits row.
        self.sampled = {"from_top": 0, "from_full": 0}

    @property
    def ahead(self) -> bool:
        return self._worker is not None

    def _started(self) -> None:
        self._thread = threading.current_thread()

    def on_worker(self, call: Callable[..., Any]) -> Callable[..., Any]:
        """``call``, run on this scheduler's decode worker when there is one (the caller waits), else as
        it is; a call already on that worker runs at once."""
        worker = self._worker
        if worker is None:
            return call

        def run(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is self._thread:
                return call(*args, **kwargs)
            return worker.submit(call, *args, **kwargs).result()

        return run

    def launch(self, groups: Sequence[Any], vocab_size: int) -> None:
        """Start one decode step for every row of every group (on the worker when ``ahead``)."""
        k = self.top_tokens if vocab_size > topk.MIN_VOCAB else 0
        for group in groups:
            rows = list(group.rows)
            greedy = getattr(group, "forward_greedy", None)  # a batch that picks argmax tokens on its device
            top = getattr(group, "forward_top", None) if k else None  # one that gives each row's best logits
            needs = [r.needs_logits for r in rows] if greedy is not None else [True] * len(rows)
            pending = [r.pending_token for r in rows]
            # Steering's bonus and the EOS ban go into the top k on the device (the values come back bonused).
            bonuses = [r.bonus() if need else {} for r, need in zip(rows, needs)] if top is not None else []

            def run(group: Any = group, greedy: Any = greedy, top: Any = top,
                    needs: list[bool] = needs, pending: list[int] = pending,
                    bonuses: list[dict[int, float]] = bonuses) -> StepOutput:
                out = StepOutput()
                if not any(needs):
                    out.tokens = greedy(pending)  # (rows,): no logits leave the device
                elif top is not None:
                    out.best = top(pending, k, bonuses)  # (rows, k) candidates; a whole row only on demand
                else:
                    out.logits = group.forward(pending)  # (rows, vocab)
                if greedy is not None and any(needs) and not all(needs):
                    out.tokens = group.last_argmax()  # the device's argmax still serves the plain rows
                return out

            self._flights.append(Flight(rows, needs, self._submit(run)))

    def _submit(self, run: Callable[[], StepOutput]) -> Future[StepOutput]:
        if self._worker is not None:
            return self._worker.submit(run)
        future: Future[StepOutput] = Future()
        try:
            future.set_result(run())
        except Exception as exc:
            future.set_exception(exc)
        return future

    def join(self) -> list[tuple[Flight, StepOutput | Exception]]:
        """Wait for the steps in flight; nothing runs on the model after this until ``launch``."""
        flights, self._flights = self._flights, []
        outputs: list[tuple[Flight, StepOutput | Exception]] = []
        for flight in flights:
            try:
                outputs.append((flight, flight.result.result()))
            except Exception as exc:  # the caller fails the flight's rows
                outputs.append((flight, exc))
        return outputs

    def choose(self, flight: Flight, out: StepOutput, live: Sequence[bool]) -> list[int | None]:
        """The next token of each ``live`` row from its step's output (None for the others): the
        argmax, a pick from its top candidates (the rows together, ``request.pick_from_many``), or
        a pick from its whole row where the candidates cannot decide. Sampling rows draw from their
        request's generator; nothing is taken."""
        tokens: list[int | None] = [None] * len(flight.rows)
        wanted = []  # rows that need more than the argmax
        for index, alive in enumerate(live):
            if not alive:
                continue
            if out.tokens is not None and not flight.needs[index]:
                tokens[index] = int(out.tokens[index])
            else:
                wanted.append(index)
        if out.best is not None and wanted:
            picked = pick_from_many([flight.rows[i] for i in wanted], out.best.ids[wanted], out.best.values[wanted],
                                    bonused=out.best.bonused)
            for index, token in zip(wanted, picked):
                tokens[index] = token
            self.sampled["from_top"] += sum(token is not None for token in picked)
        for index in wanted:
            if tokens[index] is None:  # the candidates cannot decide this row: its whole row can
                row = out.best.row(index) if out.best is not None else out.logits[index:index + 1]  # type: ignore[index]
                tokens[index] = flight.rows[index].pick(row)
                self.sampled["from_full"] += 1
        return tokens
