"""A reranked say in the scheduler: N candidate requests decode for one client request, which is
answered with the candidate the scorer rates best (``Scheduler.submit_reranked``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .protocol import ErrorCode
from .request import Event, Request, RequestState
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
