"""Chat rendering, response spans, truncation and padded batches.

Definitions (the defaults, and what the tests hold the code to):

* response positions: the tokens after the ``add_generation_prompt=True`` prefix, up to and
  including the first end-of-turn token; only the last assistant turn counts;
* tokenisation: the chat template's own text is tokenised with its special tokens, each
  message's content as text (``split_special_tokens``): a literal ``<|im_end|>`` inside a message
  is text, so the response tokens are the tokenisation of the reply text plus the end of turn;
* truncation to ``max_length``: cut the prompt from the left (keeping the template header, i.e.
  the tokens before the first message's content, and the generation-prompt tail, the tokens
  after the last prompt message's content), then the reply from the right; the cut points are
  token positions of these message boundaries;
* a message longer than :func:`char_budget` characters is cut before tokenising (see
  :func:`encode`), so a huge record costs memory in proportion to ``max_length``;
* masks come from lengths, never from token ids (a pad token may equal the end-of-turn token).
"""

import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lensattr.data import Example
from lensattr.types import Mask, TokenIds


class TruncationError(ValueError):
    """The reply of an example does not survive truncation to ``max_length``."""


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example: ``ids[:n_prompt]`` is the prompt, the rest the response."""

    id: str
    ids: tuple[int, ...]
    n_prompt: int

    @property
    def n_response(self) -> int:
        return len(self.ids) - self.n_prompt


@dataclass
class Batch:
    """A padded batch; ``mask`` is True at the response positions of each row."""

    ids: list[str]
    input_ids: TokenIds
    attention_mask: TokenIds
    position_ids: TokenIds
    mask: Mask

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(1)


_MAX_TOKEN_CHARS: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
_PLACEHOLDER = "\ue000lensattr-message-{}\ue001"
CHAR_MARGIN_TOKENS = 64
"""Extra tokens' worth of characters kept beyond ``max_length`` when long text is pre-cut."""


def _text_ids(tokenizer, text: str) -> list[int]:  # noqa: ANN001
    """Token ids of message text, read as text: a special-token string in it is not special."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _template_ids(tokenizer, text: str) -> list[int]:  # noqa: ANN001
    """Token ids of chat-template text (its special-token strings are special tokens)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def max_token_chars(tokenizer) -> int:  # noqa: ANN001
    """The longest vocabulary entry in characters: no token covers more characters of text.

    (A byte-level entry is spelled one character per byte, so this over-counts, never under.)
    """
    cached = _MAX_TOKEN_CHARS.get(tokenizer)
    if cached is None:
        special = set(getattr(tokenizer, "all_special_tokens", []))
        cached = max((len(t) for t in tokenizer.get_vocab() if t not in special), default=1)
        _MAX_TOKEN_CHARS[tokenizer] = cached
    return int(cached)


def char_budget(tokenizer, max_length: int) -> int:  # noqa: ANN001
    """How many characters of one message can matter under ``max_length``.

    ``(max_length + CHAR_MARGIN_TOKENS) * max_token_chars(tokenizer)``: each token covers at most
    :func:`max_token_chars` characters, so that many characters make more tokens than
    ``max_length`` can keep, with a margin so the kept tokens lie far from the cut.
    """
    return (max_length + CHAR_MARGIN_TOKENS) * max_token_chars(tokenizer)


def _segments(tokenizer, example: Example) -> tuple[list[str | int], int, list[str]]:  # noqa: ANN001
    """Split the rendered chat into template text and message indices.

    Returns ``(parts, n_prompt_parts, contents)``: ``parts`` is the full rendering as a list of
    template strings and message indices (the message's content goes there), the first
    ``n_prompt_parts`` of which render the generation prompt; ``contents`` is each message's
    content as the template places it (as is, or stripped by a template that trims it).
    """
    msgs = [dict(m) for m in example.messages]
    marked = [{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(msgs)]
    prompt_t = tokenizer.apply_chat_template(
        marked[:-1], tokenize=False, add_generation_prompt=True
    )
    full_t = tokenizer.apply_chat_template(marked, tokenize=False)
    if not full_t.startswith(prompt_t):
        raise ValueError(
            f"example {example.id!r}: the chat template does not render the conversation as the "
            "generation prompt followed by the reply; lensattr cannot locate the response"
        )
    pattern = re.compile(re.escape(_PLACEHOLDER).replace(r"\{\}", r"(\d+)"))

    def split(text: str) -> list[str | int]:
        out: list[str | int] = []
        pos = 0
        for m in pattern.finditer(text):
            out += [text[pos : m.start()], int(m.group(1))]
            pos = m.end()
        return [*out, text[pos:]]

    prompt_parts, reply_parts = split(prompt_t), split(full_t[len(prompt_t) :])
    parts = prompt_parts + reply_parts
    # Each prompt message once in the prompt (in any order: some templates move the system
    # prompt), the reply once after the generation prompt.
    if sorted(p for p in prompt_parts if isinstance(p, int)) != list(range(len(msgs) - 1)) or [
        p for p in reply_parts if isinstance(p, int)
    ] != [len(msgs) - 1]:
        raise ValueError(
            f"example {example.id!r}: the chat template does not render each message's content "
            "exactly once (the reply after the generation prompt); lensattr cannot locate them"
        )
    n_prompt_parts = len(prompt_parts)
    # The template may transform content (e.g. trim it): check against the real rendering.
    real = tokenizer.apply_chat_template(msgs, tokenize=False)
    for contents in ([m["content"] for m in msgs], [m["content"].strip() for m in msgs]):
        if "".join(p if isinstance(p, str) else contents[p] for p in parts) == real:
            return parts, n_prompt_parts, contents
    raise ValueError(
        f"example {example.id!r}: the chat template changes message content in a way lensattr "
        "cannot follow; it needs the content rendered as is (or stripped)"
    )


def encode(tokenizer, example: Example, max_length: int | None = None) -> Encoded:  # noqa: ANN001
    """Render ``example`` with the tokenizer's chat template and find its response tokens.

    The template's own text is tokenised with its special tokens; each message's content is
    tokenised as text (a literal ``<|im_end|>`` in a message is text, never an end of turn), so
    the response tokens are the tokenisation of the reply text followed by the end-of-turn token.

    With ``max_length``, a message longer than :func:`char_budget` characters is cut before it is
    tokenised (a prompt message keeps its end, the reply its start): at most
    ``(max_length + 64) * max_token_chars(tokenizer)`` characters per message, which is more than
    ``max_length`` tokens can cover, so the kept tokens are those of the uncut text and a huge
    record costs memory in proportion to ``max_length``, not to its size.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        example: the example; its last message is the assistant reply.
        max_length: truncate to at most this many tokens (see the module docstring).

    Raises:
        TruncationError: the response would be cut away entirely.

    Examples:
        >>> from lensattr.testing import tiny_tokenizer
        >>> enc = encode(tiny_tokenizer(), Example.from_prompt("a", "Hi", "Yo"))
        >>> enc.n_response  # "Yo" + end-of-turn, one byte-level token each
        3
    """
    if max_length is not None and (isinstance(max_length, bool) or max_length < 1):
        raise ValueError(f"max_length must be a positive integer, not {max_length!r}")
    parts, n_prompt_parts, contents = _segments(tokenizer, example)
    reply = len(example.messages) - 1
    budget = None if max_length is None else char_budget(tokenizer, max_length)

    def ids_of(p: str | int) -> list[int]:
        if isinstance(p, str):
            return _template_ids(tokenizer, p)
        text = contents[p]
        if budget is not None and len(text) > budget:  # only this much can survive truncation
            text = text[:budget] if p == reply else text[-budget:]
        return _text_ids(tokenizer, text)

    # Prompt: header (before the first message's content), middle, tail (after the last
    # prompt message's content): cut points are token positions of these boundaries.
    prompt_parts = parts[:n_prompt_parts]
    msg_at = [i for i, p in enumerate(prompt_parts) if isinstance(p, int)]
    pieces = [ids_of(p) for p in prompt_parts]
    if msg_at:
        header = [t for ids in pieces[: msg_at[0]] for t in ids]
        middle = [t for ids in pieces[msg_at[0] : msg_at[-1] + 1] for t in ids]
        tail = [t for ids in pieces[msg_at[-1] + 1 :] for t in ids]
    else:  # no prompt messages rendered (a template that drops them): nothing to cut
        header, middle, tail = [t for ids in pieces for t in ids], [], []

    eot = end_of_turn_id(tokenizer)
    response_ids: list[int] = []
    for p in parts[n_prompt_parts:]:
        ids = ids_of(p)
        if isinstance(p, str) and eot in ids:  # the end of turn ends the response
            response_ids += ids[: ids.index(eot) + 1]
            break
        response_ids += ids
    if not response_ids:
        raise TruncationError(f"example {example.id!r}: empty response")

    n_prompt = len(header) + len(middle) + len(tail)
    if max_length is not None and n_prompt + len(response_ids) > max_length:
        excess = n_prompt + len(response_ids) - max_length
        cut = min(excess, len(middle))
        middle = middle[cut:]
        excess -= cut
        if excess > 0:
            response_ids = response_ids[: max(len(response_ids) - excess, 0)]
        if not response_ids:
            raise TruncationError(
                f"example {example.id!r}: max_length={max_length} leaves no reply tokens "
                f"(prompt header + tail alone take {len(header) + len(tail)} tokens)"
            )
    prompt_ids = header + middle + tail
    return Encoded(id=example.id, ids=tuple(prompt_ids + response_ids), n_prompt=len(prompt_ids))


def end_of_turn_id(tokenizer) -> int:  # noqa: ANN001
    """The end-of-turn token id: the tokenizer's ``eos_token_id`` (``<|im_end|>`` for ChatML)."""
    eot = tokenizer.eos_token_id
    if eot is None:
        raise ValueError("the tokenizer has no eos token; lensattr needs an end-of-turn token")
    return int(eot)


def collate(
    items: Sequence[Encoded], pad_id: int, padding_side: str = "right", device: str = "cpu"
) -> Batch:
    """Pad encoded examples into a :class:`Batch` (position ids count real tokens only)."""
    width = max(len(e.ids) for e in items)
    n = len(items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.bool)
    for i, e in enumerate(items):
        off = width - len(e.ids) if padding_side == "left" else 0
        input_ids[i, off : off + len(e.ids)] = torch.tensor(e.ids)
        attn[i, off : off + len(e.ids)] = 1
        mask[i, off + e.n_prompt : off + len(e.ids)] = True
    position_ids = (attn.cumsum(1) - 1).clamp(min=0)
    return Batch(
        ids=[e.id for e in items],
        input_ids=input_ids.to(device),
        attention_mask=attn.to(device),
        position_ids=position_ids.to(device),
        mask=mask.to(device),
    )


def length_batches(
    items: Sequence[Encoded], batch_size: int, *, by_reply: bool = False
) -> list[list[int]]:
    """Indices of ``items`` grouped into batches of similar length (longest first, stable).

    ``by_reply``: of similar reply length instead (then of similar prompt length), for gradient
    captures that cut each row at its own prompt's end (``capture(..., keep_prompt=False)``):
    their graph is rows x the longest reply, and the prompts run forward-only in calls grouped by
    length (:mod:`lensattr.backends.prefix`). Sorted so, the batches' graphs add up to the least
    any batching into ``batch_size`` rows can give.

    Examples:
        >>> items = [Encoded(f"e{i}", tuple(range(n)), p)
        ...          for i, (n, p) in enumerate([(10, 8), (10, 2), (9, 7), (9, 1)])]
        >>> length_batches(items, 2), length_batches(items, 2, by_reply=True)
        ([[0, 1], [2, 3]], [[1, 3], [0, 2]])
    """

    def size(i: int) -> tuple[int, ...]:
        return (-items[i].n_response, -items[i].n_prompt) if by_reply else (-len(items[i].ids),)

    order = sorted(range(len(items)), key=size)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
