"""Chat rendering, response spans, truncation and padded batches.

Definitions (the defaults, and what the tests hold the code to):

* response positions: the tokens after the ``add_generation_prompt=True`` prefix, up to and
  including the first end-of-turn token; only the last assistant turn counts;
* truncation to ``max_length``: cut the prompt from the left (keeping the template header, i.e.
  the tokens before the first message's content, and the generation-prompt tail), then the reply
  from the right;
* masks come from lengths, never from token ids (a pad token may equal the end-of-turn token).
"""

from collections.abc import Sequence
from dataclasses import dataclass

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


def encode(tokenizer, example: Example, max_length: int | None = None) -> Encoded:  # noqa: ANN001
    """Render ``example`` with the tokenizer's chat template and find its response tokens.

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
    msgs = [dict(m) for m in example.messages]
    prompt_text = tokenizer.apply_chat_template(
        msgs[:-1], tokenize=False, add_generation_prompt=True
    )
    full_text = tokenizer.apply_chat_template(msgs, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            f"example {example.id!r}: the chat template does not render the conversation as the "
            "generation prompt followed by the reply; lensattr cannot locate the response"
        )
    enc = tokenizer(prompt_text, add_special_tokens=False, return_offsets_mapping=True)
    prompt_ids = list(enc["input_ids"])
    response_ids = list(
        tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    )
    eot = end_of_turn_id(tokenizer)
    if eot in response_ids:
        response_ids = response_ids[: response_ids.index(eot) + 1]
    if not response_ids:
        raise TruncationError(f"example {example.id!r}: empty response")

    if max_length is not None and len(prompt_ids) + len(response_ids) > max_length:
        offsets = enc["offset_mapping"]
        first = msgs[0]["content"]
        header_chars = prompt_text.find(first) if first else 0
        last = msgs[-2]["content"]
        tail_chars = prompt_text.rfind(last) + len(last) if last else len(prompt_text)
        n_header = sum(1 for s, _ in offsets if s < max(header_chars, 0))
        n_tail = sum(1 for _, e in offsets if e > tail_chars)
        n_header = min(n_header, len(prompt_ids) - n_tail)
        excess = len(prompt_ids) + len(response_ids) - max_length
        removable = len(prompt_ids) - n_header - n_tail
        cut = min(excess, removable)
        prompt_ids = prompt_ids[:n_header] + prompt_ids[n_header + cut :]
        excess -= cut
        if excess > 0:
            response_ids = response_ids[: max(len(response_ids) - excess, 0)]
        if not response_ids:
            raise TruncationError(
                f"example {example.id!r}: max_length={max_length} leaves no reply tokens "
                f"(prompt header + tail alone take {len(prompt_ids)} tokens)"
            )
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


def length_batches(items: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Indices of ``items`` grouped into batches of similar length (longest first, stable)."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i].ids))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
