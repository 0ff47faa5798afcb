"""An NPC says something before it may stop: end-of-sequence is banned until the reply has visible text.

A small model, sampled, sometimes ends a reply at once or after a space or a line break ("Bram: ",
finish_reason "stop", two tokens). The game then shows an empty bubble and, by design, nothing is
remembered of the exchange. So while the reply's tokens decode to whitespace only, every EOS token
gets a bonus of -inf (``sampling.add_bonus``): the model's next best token is taken instead. After
the first token with visible text, nothing changes. The length limit and stop strings can still end
a reply early; this only takes EOS away from the very start.

One ``FirstWords`` per reply; ``see`` each token taken. Not thread-safe.
"""

from __future__ import annotations

from collections.abc import Iterable

from .tokenizer import Tokenizer

_BANNED = float("-inf")


class FirstWords:
    """Tracks whether a reply has said anything yet; ``bonus`` bans EOS until it has."""

    def __init__(self, tokenizer: Tokenizer, eos_ids: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self._ban = {int(t): _BANNED for t in eos_ids}
        self.spoken = not self._ban  # a model without EOS tokens has nothing to ban

    def see(self, token: int) -> None:
        """Note ``token`` as the reply's next one."""
        if not self.spoken and token not in self._ban and self._tokenizer.decode([token]).strip():
            self.spoken = True

    def bonus(self) -> dict[int, float]:
        """Token id → logit bonus for the next token: -inf for each EOS id while nothing is said."""
        return {} if self.spoken else self._ban


def with_first_words(bonus: dict[int, float], first: FirstWords) -> dict[int, float]:
    """``bonus`` (steering's) with ``first``'s ban on top (a banned token stays banned)."""
    ban = first.bonus()
    return {**bonus, **ban} if ban else bonus
