"""Dialogue format of a model, decided at export so the runtime needs neither transformers nor Jinja.

Chat models: their Jinja chat template is rendered with sentinel messages and cut into literal
prefix/suffix pieces per role (``ChatFormat``). The cut is checked by re-rendering a real
conversation both ways; a template the pieces cannot reproduce (e.g. one that folds the system
prompt into the first user turn) is refused with a clear error instead of silently mis-prompting.
Models without a template (DialoGPT, GPT-2) use EOS-joined turns.
"""

from __future__ import annotations

from typing import Any

from npctalk.engine.bundle import ChatFormat
from npctalk.engine.errors import UnsupportedModelError

_S, _U, _A = "\x01SYSTEM\x01", "\x01USER\x01", "\x01ASSISTANT\x01"
# Tokens a chat model may end its turn with, beyond the config's eos id.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "</s>", "<end_of_turn>")


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_format_from_tokenizer(tokenizer: Any) -> ChatFormat:
    """Cut ``tokenizer.chat_template`` into a ``ChatFormat``; raise ``UnsupportedModelError`` if it cannot be.

    Renders growing conversations (system; + user; + generation prompt; + assistant) and takes each
    role's pieces from the difference, then checks the pieces against a full render.
    """
    sys_msg, user_msg, asst_msg = ({"role": r, "content": c} for r, c in (("system", _S), ("user", _U), ("assistant", _A)))
    try:
        r1 = _render(tokenizer, [sys_msg], False)
        r2 = _render(tokenizer, [sys_msg, user_msg], False)
        r3 = _render(tokenizer, [sys_msg, user_msg], True)
        r4 = _render(tokenizer, [sys_msg, user_msg, asst_msg], False)
        no_system = _render(tokenizer, [user_msg], False)
    except Exception as exc:  # Jinja raises TemplateError and friends for templates that need other roles
        raise UnsupportedModelError(f"The model's chat template could not render a system/user/assistant dialogue: {exc}") from exc
    # A BOS the template writes once (Llama-3 style) opens every conversation, with or without a
    # system turn; a token that opens every turn (ChatML's <|im_start|>, often also named bos) is
    # part of the role prefixes instead.
    bos = tokenizer.bos_token if isinstance(getattr(tokenizer, "bos_token", None), str) else ""
    if not (bos and all(r.startswith(bos) for r in (r1, r2, r3, r4, no_system)) and not r2[len(r1):].startswith(bos)):
        bos = ""
    r1, r2, r3, r4 = (r[len(bos):] for r in (r1, r2, r3, r4))
    if not (r2.startswith(r1) and r3.startswith(r2) and r4.startswith(r2) and _S in r1 and _U in r2 and _A in r4):
        raise UnsupportedModelError(
            "The model's chat template does not render turns one after another (it rewrites earlier turns "
            "or drops roles); npctalk cannot reproduce it without Jinja."
        )
    user_part, asst_part = r2[len(r1):], r4[len(r2):]
    fmt = ChatFormat(
        system_prefix=r1[: r1.index(_S)],
        system_suffix=r1[r1.index(_S) + len(_S):],
        user_prefix=user_part[: user_part.index(_U)],
        user_suffix=user_part[user_part.index(_U) + len(_U):],
        assistant_prefix=r3[len(r2):],
        assistant_suffix=asst_part[asst_part.index(_A) + len(_A):],
        bos=bos,
    )
    fmt = ChatFormat(**{**fmt.__dict__, "default_system": _default_system(no_system, fmt)})
    check = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name?"}]
    # Without a system message the template may inject its default one (SmolLM2 does).
    implicit = [{"role": "system", "content": fmt.default_system}] if fmt.default_system else []
    for given, rendered_as in ((check, check), (check[1:], implicit + check[1:])):
        expected = _render(tokenizer, given, True)
        if render_chat(fmt, rendered_as) != expected:
            raise UnsupportedModelError(
                "The model's chat template is not a plain per-role prefix/suffix format; npctalk cannot "
                f"reproduce it without Jinja. Template renders {expected!r}, pieces give {render_chat(fmt, rendered_as)!r}."
            )
    return fmt


def render_chat(fmt: ChatFormat, messages: list[dict[str, str]]) -> str:
    """Render messages with the pieces (the runtime does the same token by token)."""
    pieces = {"system": (fmt.system_prefix, fmt.system_suffix), "user": (fmt.user_prefix, fmt.user_suffix),
              "assistant": (fmt.assistant_prefix, fmt.assistant_suffix)}
    out = fmt.bos
    for m in messages:
        pre, suf = pieces[m["role"]]
        out += pre + m["content"] + suf
    return out + fmt.assistant_prefix


def _default_system(no_system: str, fmt: ChatFormat) -> str | None:
    """The system prompt the template injects when none is given (SmolLM2 does), or None."""
    head = no_system[: no_system.index(_U)] if _U in no_system else ""
    head = head[len(fmt.bos):]
    if head.startswith(fmt.system_prefix) and head.endswith(fmt.system_suffix + fmt.user_prefix):
        text = head[len(fmt.system_prefix): len(head) - len(fmt.system_suffix + fmt.user_prefix)]
        return text or None
    return None


def end_of_turn_ids(tokenizer: Any, config_eos: int | list[int] | None) -> tuple[int, ...]:
    """All ids that end a reply: the config's eos id(s) plus known end-of-turn tokens in the vocab."""
    ids: list[int] = []
    if isinstance(config_eos, int):
        ids.append(config_eos)
    elif config_eos:
        ids.extend(int(i) for i in config_eos)
    vocab = tokenizer.get_vocab()
    ids.extend(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return tuple(dict.fromkeys(ids))
