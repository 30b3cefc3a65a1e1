"""Chat rendering, response spans, truncation and masks."""

import pytest
import torch

from lensattr.data import Example
from lensattr.render import TruncationError, collate, encode


def test_response_is_reply_plus_end_of_turn(tiny):
    tok = tiny.tokenizer
    ex = Example.from_prompt("a", "Hi", "Yo there")
    enc = encode(tok, ex)
    prefix = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert tok.decode(enc.ids[: enc.n_prompt]) == prefix
    assert tok.decode(enc.ids[enc.n_prompt :]) == "Yo there<|im_end|>"  # the trailing "\n" is cut


def test_only_last_assistant_turn_counts(tiny):
    msgs = (
        {"role": "user", "content": "A"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "B"},
        {"role": "assistant", "content": "second"},
    )
    enc = encode(tiny.tokenizer, Example(id="m", messages=msgs))
    assert tiny.tokenizer.decode(enc.ids[enc.n_prompt :]) == "second<|im_end|>"
    assert "first" in tiny.tokenizer.decode(enc.ids[: enc.n_prompt])


def test_truncation_cuts_prompt_left_keeping_header_then_reply_right(tiny):
    tok = tiny.tokenizer
    ex = Example.from_prompt("t", "0123456789" * 3, "abcdef")
    full = encode(tok, ex)
    enc = encode(tok, ex, max_length=len(full.ids) - 5)
    prompt = tok.decode(enc.ids[: enc.n_prompt])
    assert len(enc.ids) == len(full.ids) - 5
    assert prompt.startswith(
        "<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n<|im_start|>user\n56789"
    )  # header kept, prompt cut from the left
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(enc.ids[enc.n_prompt :]) == "abcdef<|im_end|>"
    n_fixed = enc.n_prompt - 0  # prompt shrinks to header + tail, then the reply is cut
    short = encode(tok, ex, max_length=full.n_prompt - 30 + 3)
    assert tok.decode(short.ids[short.n_prompt :]) == "abc"
    assert n_fixed > short.n_prompt
    with pytest.raises(TruncationError, match="no reply tokens"):
        encode(tok, ex, max_length=full.n_prompt - 30)


def test_masks_come_from_lengths_even_when_pad_equals_end_of_turn(tiny):
    tok = tiny.tokenizer
    assert tok.pad_token_id == tok.eos_token_id
    encs = [
        encode(tok, Example.from_prompt(str(i), "Q" * (i + 1), "R" * (3 - i))) for i in range(3)
    ]
    for side in ("right", "left"):
        b = collate(encs, tiny.pad_id, side)
        for row, e in enumerate(encs):
            assert int(b.mask[row].sum()) == e.n_response
            assert b.input_ids[row][b.mask[row]].tolist() == list(e.ids[e.n_prompt :])
            real = b.attention_mask[row].bool()
            assert b.position_ids[row][real].tolist() == list(range(len(e.ids)))
        assert b.mask.dtype == torch.bool


def test_reply_longer_cut_than_it_has_is_an_error_not_a_wraparound(tiny):
    # Found by the hypothesis test: header + tail alone exceed max_length, and the excess is
    # larger than the reply; a negative slice used to keep part of the reply.
    ex = Example.from_prompt("a", "<<", "<<<<<<<<<ééé")
    with pytest.raises(TruncationError, match="no reply tokens"):
        encode(tiny.tokenizer, ex, max_length=44)
