"""Property test of the tokenizer path (issue 11): random message text with special-token strings,
long records and odd bytes, read from a jsonl file, encoded as the cache encodes it.

Checked for every example: the response tokens are the tokenisation of the reply text read as text
(no special token inside it; decoding gives the reply back) followed by one end-of-turn token; with
``max_length``, the cut is a prefix of that, and pre-cutting long text to :func:`char_budget`
characters gives exactly the tokens of the uncut text. Runs on the tiny model's byte-level
tokenizer and, when it is on this machine, the real SmolLM2 tokenizer (BPE merges).
"""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lensattr.render as render
from lensattr.backends.models import lensattr_home
from lensattr.data import Example, load_examples
from lensattr.render import TruncationError, encode
from lensattr.testing import SPECIAL_TOKENS, tiny_tokenizer


def _tokenizers() -> list:
    # (tokenizer, lossless): SmolLM2's vocabulary lacks some byte tokens, so a rare character
    # (e.g. U+40000) does not decode back; the tiny byte-level one holds all 256 bytes.
    toks = [pytest.param(tiny_tokenizer(), True, id="tiny")]
    real = lensattr_home() / "models" / "smollm2-135m-instruct"
    if (real / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        toks.append(pytest.param(AutoTokenizer.from_pretrained(real), False, id="smollm2"))
    return toks


TOKENIZERS = _tokenizers()
PIECE = st.one_of(
    st.sampled_from(SPECIAL_TOKENS + ["<|im_start|>assistant\n", "<|", "|>", "im_end"]),
    st.text(st.sampled_from(" \n\t\r\x00abcé😀\u2028\ufeff#=-<|>"), max_size=6),
    st.text(max_size=4),  # anything Unicode, surrogates excluded by hypothesis' default
)
TEXT = st.lists(PIECE, max_size=6).map("".join)
LONG = st.tuples(TEXT, st.integers(1, 3000)).map(lambda t: t[0] * t[1])  # long records
CONTENT = st.one_of(TEXT, TEXT, LONG)
RECORD = st.fixed_dictionaries(
    {"prompt": CONTENT, "response": CONTENT}, optional={"system": TEXT}
).filter(lambda r: r["response"].strip() != "")
ODD = st.sampled_from([b"\xe9", b"\xff\xfe", b"\xc3", b"\xed\xa0\x80"])  # bytes that are not UTF-8


def _no_precut(tokenizer, max_length: int) -> int:  # noqa: ANN001
    return 1 << 60


@pytest.mark.parametrize(("tok", "lossless"), TOKENIZERS)
@settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    records=st.lists(st.tuples(RECORD, st.one_of(st.none(), ODD)), min_size=1, max_size=4),
    max_length=st.one_of(st.none(), st.integers(8, 300)),
)
def test_response_tokens_are_the_reply_text_tokenised(
    tok, lossless, records, max_length, monkeypatch
):
    eot = tok.eos_token_id
    special = set(tok.all_special_ids)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train.jsonl"
        lines = []
        for i, (rec, odd) in enumerate(records):
            line = json.dumps({"id": f"r{i}", **rec}).encode()
            lines.append(line[:-2] + odd + line[-2:] if odd else line)  # odd bytes in the reply
        path.write_bytes(b"\n".join(lines) + b"\n")
        skipped: list[dict[str, str]] = []
        exs = load_examples(path, on_error="skip", skipped=skipped)
    # A line with bytes that are not UTF-8 is skipped, named by file and line; the rest load.
    assert [s["where"] for s in skipped] == [
        f"{path}:{i + 1}" for i, (_, odd) in enumerate(records) if odd
    ]
    assert all("not UTF-8 text" in s["reason"] for s in skipped)
    assert [e.response for e in exs] == [r["response"] for r, odd in records if not odd]
    for ex in exs:
        want = list(tok(ex.response, add_special_tokens=False, split_special_tokens=True).input_ids)
        assert not special & set(want)  # the reply's text never holds a special token
        assert not lossless or tok.decode(want) == ex.response
        try:
            enc = encode(tok, ex, max_length)
        except TruncationError:
            assert max_length is not None
            continue
        got = list(enc.ids[enc.n_prompt :])
        if max_length is None:
            assert got == [*want, eot]
        else:
            assert len(enc.ids) <= max_length and got == [*want, eot][: len(got)]
            with monkeypatch.context() as m:  # the same tokens without the pre-cut
                m.setattr(render, "char_budget", _no_precut)
                assert encode(tok, ex, max_length) == enc


def test_example_objects_with_special_strings_pass_too():
    tok = tiny_tokenizer()
    ex = Example.from_prompt("x", "<|im_end|>", "<|endoftext|>", system="<|im_start|>")
    enc = encode(tok, ex)
    assert list(enc.ids).count(tok.eos_token_id) == 3  # system and user turns + the reply
