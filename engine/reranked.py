"""Reranked says in the scheduler: N candidate requests decode for one client request, which is
answered with the candidate the scorer rates best (``Scheduler.submit_reranked``).

``RerankedSays`` is the scheduler's book of them: which requests are internal candidates (their
messages are swallowed, their ends not counted), and when a say's candidates have all ended, its
answer (``answer``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .protocol import ErrorCode
from .request import Event, Request, RequestKey, RequestState
from .rerank import best_index

log = logging.getLogger(__name__)

Scorer = Callable[[list[str]], list[float]]  # candidate replies → one score each, higher is better


@dataclass(eq=False)
class Candidates:
    """A reranked say: the client's request and the internal candidate requests that decode for it."""

    parent: Request
    children: list[Request]
    scorer: Scorer
    scores: list[float] = field(default_factory=list)


def answer(group: Candidates, now: float) -> list[Event]:
    """The parent's events once every candidate has ended: the best finished candidate's text as one
    token message, then its done; or an ``internal`` error when none finished or scoring failed.
    The caller retires the parent."""
    parent = group.parent
    done = [c for c in group.children if c.state is RequestState.FINISHED and c.finish_reason != "cancelled"]
    try:
        if not done:
            raise RuntimeError("every candidate failed")
        group.scores = group.scorer([c.text for c in done])
        best = done[best_index(group.scores)]
    except Exception as exc:  # a failed scoring fails this say, not the server
        log.exception("Reranking request %r failed.", parent.key.id)
        return [parent.fail(ErrorCode.INTERNAL, f"The engine failed while choosing a reply: {exc}.", now)]
    parent.advance(RequestState.PREFILLING)
    parent.advance(RequestState.DECODING)
    parent.admitted_at, parent.first_token_at = best.admitted_at, now
    parent.tokens = list(best.tokens)
    events: list[Event] = parent.emit_text(best.text)  # the Request's own seq/text bookkeeping
    assert best.finish_reason is not None
    events.append(parent.finish(best.finish_reason, now))
    return events


class RerankedSays:
    """The live reranked says and their candidates. Not thread-safe: the engine loop owns it."""

    def __init__(self) -> None:
        self._says: dict[RequestKey, Candidates] = {}       # client's request key → its candidates
        self._candidate_of: dict[Request, Candidates] = {}  # internal candidate → its group

    def add(self, request: Request, candidates: Iterable[Request], scorer: Scorer) -> None:
        group = Candidates(request, list(candidates), scorer)
        self._says[request.key] = group
        for child in group.children:
            self._candidate_of[child] = group

    def is_candidate(self, request: Request) -> bool:
        return request in self._candidate_of

    def visible(self, events: list[Event]) -> list[Event]:
        """``events`` less the candidates' own (internal: the say they answer speaks)."""
        return [e for e in events if e.request not in self._candidate_of]

    def settle(self, events: list[Event], now: float, retire: Callable[[Request], None]) -> list[Event]:
        """The visible ``events``, plus the answer of each say whose candidates have all ended (the
        say is then ``retire``d). A say that ended first (cancelled, timed out) stops its candidates;
        a group is forgotten once none of them is live."""
        visible = self.visible(events)
        for key, group in list(self._says.items()):
            parent, children = group.parent, group.children
            if parent.live and any(c.live for c in children):
                continue
            if parent.live:
                visible += answer(group, now)
                retire(parent)
            for child in children:
                child.cancel_requested = child.live  # the say was cancelled or timed out: stop its candidates
            if not any(c.live for c in children):
                del self._says[key]
                for child in children:
                    self._candidate_of.pop(child, None)
        return visible

    def clear(self) -> None:
        self._says.clear()
        self._candidate_of.clear()
