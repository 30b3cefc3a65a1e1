"""Bad input: every kind of bad record is a clear error (file, line, field) or, with
``on_error="skip"``, skipped and listed in the manifest with the reason. Long examples lose the left
of their prompt, never the reply. A hypothesis property test pushes random records through loading,
encoding and capture.
"""

import json
import math
import re
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lensattr import build_cache, load_examples, load_pairs
from lensattr.backends.capture import capture
from lensattr.data import DataError, Example
from lensattr.render import TruncationError, collate, encode
from lensattr.store.cache import CacheError

GOOD = {"id": "good", "prompt": "Say hi.", "response": "Hi!"}


def jsonl(path: Path, lines: list) -> Path:  # noqa: ANN001
    """Write ``lines`` (dicts are JSON-encoded, strings written as they are) one per line."""
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def where(path: Path, line: int) -> str:
    return re.escape(f"{path}:{line}")


# ----------------------------------------------------------------- each bad record, raised


@pytest.mark.parametrize(
    ("bad", "field", "problem"),
    [
        ('{"id": "x", "prompt": "Hi", "response": "Yo"', None, "invalid JSON"),
        ("[1, 2, 3]", None, "expected a JSON object, got list"),
        ({"id": "x", "prompt": "Hi"}, "response", "missing"),
        ({"id": "x", "response": "Yo"}, "prompt", "missing"),
        ({"id": "x", "prompt": 7, "response": "Yo"}, "prompt", "expected a string, got int"),
        (
            {"id": "x", "prompt": "Hi", "response": ["Yo"]},
            "response",
            "expected a string, got list",
        ),
        ({"id": "x", "prompt": "Hi", "response": ""}, "response", "empty"),
        ({"id": "x", "prompt": "Hi", "response": " \n\t"}, "response", "empty"),
        ({"id": 1.5, "prompt": "Hi", "response": "Yo"}, "id", "expected a string, got float"),
        ({"id": "x", "text": "Hi"}, "messages", "missing"),
        ({"id": "x", "messages": []}, "messages", "non-empty list"),
        (
            {"id": "x", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]},
            "messages[1].content",
            "missing",
        ),
        (
            {
                "id": "x",
                "messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "A"}],
            },
            "messages[0].content",
            "expected a string, got int",
        ),
        (
            {
                "id": "x",
                "messages": [
                    {"role": "bot", "content": "Hi"},
                    {"role": "assistant", "content": "A"},
                ],
            },
            "messages[0].role",
            "unknown role 'bot'",
        ),
        (
            {"id": "x", "messages": [{"role": "user", "content": "Hi"}]},
            "messages",
            "the last message must be the assistant's reply",
        ),
        (
            {
                "id": "x",
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": ""},
                ],
            },
            "messages[-1].content",
            "empty",
        ),
    ],
)
def test_bad_record_names_file_line_and_field(tmp_path, bad, field, problem):
    path = jsonl(tmp_path / "train.jsonl", [GOOD, "", bad])  # a blank line still counts
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert err.value.where == f"{path}:3"
    assert err.value.field == field
    assert problem in err.value.problem
    loc = f"{path}:3, field '{field}'" if field else f"{path}:3"
    assert str(err.value).startswith(loc + ": ")


def test_duplicate_id_names_both_lines(tmp_path):
    path = jsonl(tmp_path / "train.jsonl", [GOOD, {**GOOD, "response": "Hello"}])
    with pytest.raises(
        DataError,
        match=where(path, 2) + ", field 'id': duplicate example id "
        "'good' \\(first at " + where(path, 1) + r"\)",
    ):
        load_examples(path)


def test_bad_pair_names_file_line_and_field(tmp_path):
    path = jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "Q", "treatment": "T", "control": "C"},
            {"prompt": "Q", "treatment": "T"},
            "{oops",
        ],
    )
    with pytest.raises(DataError, match=where(path, 2) + ", field 'control': missing"):
        load_pairs(path)
    path = jsonl(tmp_path / "pairs2.jsonl", ["{oops"])
    with pytest.raises(DataError, match=where(path, 1) + ": invalid JSON"):
        load_pairs(path)


def test_unknown_on_error_is_refused():
    with pytest.raises(ValueError, match="on_error"):
        load_examples([GOOD], on_error="ignore")


# ------------------------------------------------------------------ skipped and listed


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """A training file with one record of each kind of problem among good ones."""
    path = tmp_path_factory.mktemp("messy") / "train.jsonl"
    short = "Be brief."  # an explicit system prompt: a short template header (see below)
    lines = [
        {"id": "a", "system": short, "prompt": "What is two plus two?", "response": "Four."},
        "{not json",  # 2
        {"id": "b", "prompt": "Hi"},  # 3: no response
        {"id": "c", "prompt": "Hi", "response": 42},  # 4: not a string
        {"id": "d", "prompt": "Hi", "response": "   "},  # 5: empty reply
        {"id": "a", "prompt": "Again", "response": "Dup."},  # 6: duplicate id
        {"id": "long", "system": short, "prompt": "word " * 40, "response": "Kept."},  # 7
        {"id": "e", "system": short, "prompt": "Name a colour.", "response": "Blue."},
    ]
    return jsonl(path, lines)


def test_skip_lists_every_bad_record(messy):
    skipped: list[dict[str, str]] = []
    exs = load_examples(messy, on_error="skip", skipped=skipped)
    assert [e.id for e in exs] == ["a", "long", "e"]
    assert [s["where"] for s in skipped] == [f"{messy}:{n}" for n in (2, 3, 4, 5, 6)]
    assert [s["id"] for s in skipped] == ["", "b", "c", "d", "a"]
    reasons = [s["reason"] for s in skipped]
    for reason, text in zip(
        reasons,
        ["invalid JSON", "'response': missing", "expected a string", "empty", "duplicate"],
        strict=True,
    ):
        assert text in reason
    assert exs[0].response == "Four."  # the first of two records with the same id is kept


def test_build_skips_and_lists_in_the_manifest(tmp_path, tiny, messy):
    # Truncation keeps the template header (everything before the first message's content) and
    # the generation prompt. With max_length 40, "long" loses most of its prompt but keeps its
    # reply; "cut" has no system message, so its header holds the template's default system
    # prompt (~46 tokens) and no reply token fits.
    cut = {"id": "cut", "prompt": "Hi", "response": "Hello."}
    path = jsonl(tmp_path / "train.jsonl", [*messy.read_text().splitlines(), cut])
    with pytest.raises(DataError, match=where(path, 2)):
        build_cache(tiny, path, out=tmp_path / "raise", layers=[1], max_length=40)
    cache = build_cache(tiny, path, out=tmp_path / "c", layers=[1], max_length=40, on_error="skip")
    assert cache.ids == ["a", "long", "e"]
    skipped = cache.manifest["skipped"]
    assert [s["id"] for s in skipped] == ["", "b", "c", "d", "a", "cut"]
    last = skipped[-1]
    assert last["where"] == f"{path}:9" and "leaves no reply tokens" in last["reason"]
    assert all(s["reason"] for s in skipped)


def test_reply_cut_away_by_max_length_names_file_and_line(tmp_path, tiny):
    ok = {"id": "ok", "system": "s" * 100, "prompt": "Hi", "response": "Yo"}  # short header
    rec = {"id": "x", "prompt": "Hi", "response": "Yo"}  # the default system prompt: long header
    path = jsonl(tmp_path / "train.jsonl", [ok, rec])
    with pytest.raises(
        DataError, match=where(path, 2) + ", field 'messages': .*'x'.*max_length=30"
    ):
        build_cache(tiny, path, out=tmp_path / "c", layers=[1], max_length=30)


def test_cli_reports_bad_input_and_skips_it(tmp_path, messy, capsys):
    from lensattr.cli import main

    args = [
        "cache",
        "--model",
        "tiny-random",
        "--device",
        "cpu",
        "--train",
        str(messy),
        "--layers",
        "1",
        "--stats",
        "resid_post",
        "--quiet",
    ]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert f"{messy}:2: invalid JSON" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--skip-bad"]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["n_rows"] == 3 and len(manifest["skipped"]) == 5


# ------------------------------------------------------------------- non-finite gradients


def _poison(monkeypatch, bad_id: str) -> None:  # noqa: ANN001
    """Make the activation gradient of example ``bad_id`` NaN, as an overflow would."""
    import lensattr.build

    real = lensattr.build.capture

    def poisoned(model, batch, layers, **kw):  # noqa: ANN001, ANN202
        acts = real(model, batch, layers, **kw)
        for row, eid in enumerate(batch.ids):
            if eid == bad_id:
                for la in acts.values():
                    if la.grad is not None:
                        la.grad[row] = float("nan")
        return acts

    monkeypatch.setattr(lensattr.build, "capture", poisoned)


def test_non_finite_gradient_raises_or_is_skipped(tmp_path, tiny, train_records, monkeypatch):
    _poison(monkeypatch, "ex3")
    with pytest.raises(
        CacheError, match=r"example 'ex3': non-finite .* at layer .*on_error='skip'"
    ):
        build_cache(tiny, train_records, out=tmp_path / "a", layers=[1, 2], shard_size=5)
    cache = build_cache(
        tiny, train_records, out=tmp_path / "b", layers=[1, 2], shard_size=5, on_error="skip"
    )
    assert "ex3" not in cache.ids and len(cache) == len(train_records) - 1
    (entry,) = cache.manifest["skipped"]
    assert entry["id"] == "ex3" and "non-finite" in entry["reason"]
    for stat in cache.stats:
        assert torch.isfinite(cache.stat(stat, 2)[:].float()).all()


# ---------------------------------------------------------------- truncation keeps the reply


def test_long_prompt_is_cut_from_the_left_and_the_reply_kept(tiny):
    tok = tiny.tokenizer
    prompt = " ".join(f"w{i}" for i in range(60))
    ex = Example.from_prompt("long", prompt, "The reply stays whole.")
    full = encode(tok, ex)
    cut = encode(tok, ex, max_length=len(full.ids) - 50)
    assert len(cut.ids) == len(full.ids) - 50
    assert cut.ids[cut.n_prompt :] == full.ids[full.n_prompt :]  # the whole reply
    text = tok.decode(cut.ids[: cut.n_prompt])
    head = tok.decode(full.ids[: full.n_prompt]).split(prompt)[0]
    assert text.startswith(head)  # the template header survives
    assert text.endswith("w59<|im_end|>\n<|im_start|>assistant\n")  # the end of the prompt too
    assert "w0 " not in text  # the start of the prompt went first


# ---------------------------------------------------------------- property: random records

TEXT = st.text(st.sampled_from('ab c\n"{}é😀\\<|>'), max_size=12)
VALUE = st.one_of(
    TEXT, st.none(), st.integers(-3, 3), st.floats(allow_nan=True), st.lists(TEXT, max_size=2)
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.one_of(st.sampled_from(["system", "user", "assistant"]), VALUE),
        "content": st.one_of(TEXT, VALUE),
    }
)
RECORD = st.one_of(
    st.fixed_dictionaries(
        {"id": st.sampled_from(["a", "b", "c", 1]), "prompt": TEXT, "response": TEXT}
    ),
    st.fixed_dictionaries(
        {"id": st.one_of(st.sampled_from(["a", "b", "c"]), VALUE)},
        optional={"prompt": VALUE, "response": VALUE, "system": VALUE},
    ),
    st.fixed_dictionaries(
        {"id": st.sampled_from(["d", "e"]), "messages": st.lists(MESSAGE, max_size=3)}
    ),
    st.sampled_from(["{", "[]", "null", '"text"', "{'single': 'quotes'}"]),
)


@settings(
    max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(records=st.lists(RECORD, max_size=5), max_length=st.one_of(st.none(), st.integers(4, 90)))
def test_random_records_through_loading_and_capture(tiny, records, max_length):
    with tempfile.TemporaryDirectory() as d:
        path = jsonl(Path(d) / "train.jsonl", records)
        skipped: list[dict[str, str]] = []
        exs = load_examples(path, on_error="skip", skipped=skipped)
        # Every line is either loaded or listed with its place and reason.
        assert len(exs) + len(skipped) == len(records)
        assert len({e.id for e in exs}) == len(exs)
        for s in skipped:
            assert s["where"].startswith(f"{path}:") and s["reason"].startswith(s["where"])
        for e in exs:
            assert e.response.strip() and e.messages[-1]["role"] == "assistant"
        # In raise mode: the same examples, or an error at the first skipped line.
        try:
            assert load_examples(path) == exs and not skipped
        except DataError as err:
            assert skipped and err.where == skipped[0]["where"]

    encoded = []
    for e in exs:
        try:
            enc = encode(tiny.tokenizer, e, max_length)
        except TruncationError as err:
            assert max_length is not None and "leaves no reply tokens" in str(err)
            continue
        assert enc.n_response >= 1
        assert max_length is None or len(enc.ids) <= max_length
        encoded.append(enc)
    if encoded:
        batch = collate(encoded, tiny.pad_id)
        acts = capture(tiny, batch, [1])[1]
        assert acts.grad is not None and torch.isfinite(acts.grad).all()
        assert acts.mask.sum(1).tolist() == [e.n_response for e in encoded]


def test_nan_and_infinity_in_json_are_not_strings(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"id": "x", "prompt": NaN, "response": "ok"}\n')
    with pytest.raises(DataError, match="field 'prompt': expected a string, got float"):
        load_examples(path)
    assert math.isnan(json.loads(path.read_text())["prompt"])
