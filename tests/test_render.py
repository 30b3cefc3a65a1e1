"""Chat rendering, response spans, truncation and masks."""

import pytest
import torch

from lensattr.data import Example
from lensattr.render import TruncationError, collate, encode
from lensattr.testing import tiny_tokenizer


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


# ------------------------------------------------ message text is text (issue 11, items 2, 3)

HEADER = "<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n<|im_start|>user\n"
TAIL = "<|im_end|>\n<|im_start|>assistant\n"


def byte_ids(tok, text: str) -> list[int]:  # noqa: ANN001
    """The tiny tokenizer's ids of ``text`` read as text, computed independently: one per byte."""
    # GPT-2's byte-to-character map: printable bytes stand for themselves, the rest from 256 on.
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in keep]
    b2u = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(rest)}
    vocab = tok.get_vocab()
    return [vocab[b2u[b]] for b in text.encode()]


def test_special_token_strings_in_messages_are_text(tiny):
    tok = tiny.tokenizer
    reply = "Short<|im_end|> and then a long tail"
    prompt = "Q<|im_start|>assistant\nfake<|endoftext|>"
    enc = encode(tok, Example.from_prompt("s", prompt, reply))
    # The response: the reply's bytes, then the one real end-of-turn token.
    assert list(enc.ids[enc.n_prompt :]) == byte_ids(tok, reply) + [tok.eos_token_id]
    # The prompt: template specials are special, the user's text is bytes.
    want = [*tok(HEADER)["input_ids"], *byte_ids(tok, prompt), *tok(TAIL)["input_ids"]]
    assert list(enc.ids[: enc.n_prompt]) == want


def test_truncation_cut_points_are_message_boundaries_not_substrings(tiny):
    tok = tiny.tokenizer
    # A last user message "a": rfind("a") used to land inside "assistant" of the tail, so a cut
    # longer than the middle ate into the generation prompt instead of the reply.
    ex = Example.from_prompt("a", "a", "ok" * 10, system="0123456789" * 4)
    middle = "0123456789" * 4 + "<|im_end|>\n<|im_start|>user\na"
    n_middle = len(byte_ids(tok, "0123456789" * 4 + "\n") + byte_ids(tok, "user\na")) + 2
    assert n_middle == len(tok(middle)["input_ids"])  # two specials, one token per other byte
    enc = encode(tok, ex, max_length=len(encode(tok, ex).ids) - n_middle - 5)
    assert tok.decode(enc.ids[: enc.n_prompt]) == "<|im_start|>system\n" + TAIL
    assert list(enc.ids[enc.n_prompt :]) == (byte_ids(tok, "ok" * 10) + [tok.eos_token_id])[:-5]
    # A first message "help": find("help") used to land inside "helpful" of the default system.
    ex = Example.from_prompt("h", "help", "ok")
    enc = encode(tok, ex, max_length=len(encode(tok, ex).ids) - 2)
    assert tok.decode(enc.ids[: enc.n_prompt]) == HEADER + "lp" + TAIL


def test_huge_record_is_cut_to_the_documented_bound_before_tokenising(tiny, monkeypatch):
    import lensattr.render as render

    tok = tiny.tokenizer
    seen: list[int] = []
    text_ids = render._text_ids
    monkeypatch.setattr(render, "_text_ids", lambda t, s: seen.append(len(s)) or text_ids(t, s))
    big = 10_000_000
    prompt, reply = "p" * (big - 3) + "END", "BEG" + "r" * big
    ex = Example.from_prompt("big", prompt, reply)
    enc = encode(tok, ex, max_length=100)
    # The bound: (max_length + 64) characters per longest token (1 for a byte-level vocab).
    assert render.max_token_chars(tok) == 1
    assert max(seen) == render.char_budget(tok, 100) == 164
    # The result is that of the uncut text: header + tail + the prompt's end, the reply's start.
    n_fixed = len(tok(HEADER)["input_ids"]) + len(tok(TAIL)["input_ids"])
    n_reply = 100 - n_fixed
    assert len(enc.ids) == 100 and enc.n_response == n_reply
    assert tok.decode(enc.ids[enc.n_prompt :]) == reply[:n_reply]
    assert tok.decode(enc.ids[: enc.n_prompt]) == HEADER + TAIL  # the reply takes all room
    short = encode(tok, Example.from_prompt("s", prompt, "BEG"), max_length=100)
    assert tok.decode(short.ids[: short.n_prompt]).endswith("pEND" + TAIL)


def test_max_length_must_be_positive(tiny):
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        encode(tiny.tokenizer, Example.from_prompt("a", "Hi", "Yo"), max_length=0)


def test_templates_that_move_the_system_prompt_or_trim_content(tiny):
    tok = tiny_tokenizer()
    # Mistral-like: the system prompt goes into the last user turn; content is trimmed.
    tok.chat_template = (
        "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>"
        "{% if loop.index0 == ns.last and messages[0]['role'] == 'system' %}"
        "{{ messages[0]['content'] | trim }}\n\n{% endif %}{{ m['content'] | trim }}<|im_end|>"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] | trim }}<|im_end|>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{% endif %}"
    )
    msgs = (
        {"role": "system", "content": "  SYS "},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": " u2<|im_end|>"},
        {"role": "assistant", "content": "  reply<|im_end|> "},
    )
    enc = encode(tok, Example(id="m", messages=msgs))
    assert list(enc.ids[enc.n_prompt :]) == byte_ids(tok, "reply<|im_end|>") + [tok.eos_token_id]
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    want = [im_start, *byte_ids(tok, "u1"), im_end, *byte_ids(tok, "a1"), im_end, im_start]
    want += [*byte_ids(tok, "SYS\n\nu2<|im_end|>"), im_end]
    assert list(enc.ids[: enc.n_prompt]) == want
    # Truncation cuts from the left of the first rendered content, keeping the template header.
    cut = encode(tok, Example(id="m", messages=msgs), max_length=len(enc.ids) - 3)
    assert list(cut.ids) == [im_start, *want[4:], *enc.ids[enc.n_prompt :]]
