"""Every source a researcher holds data in (issue 12, item 6), explicit hub names and bytes that
are not UTF-8 (issue 11, item 13 and "unhelpful errors")."""

import csv
import json
import re

import datasets
import pandas as pd
import pytest

from lensattr import DataError, load_examples, load_pairs

FLAT = [
    {"id": "a", "prompt": "Hi", "response": "Hello", "label": 1, "source": "web"},
    {"id": "b", "prompt": "Q", "response": "R", "label": 0, "source": "book"},
]


def check(exs):  # noqa: ANN001
    assert [(e.id, e.messages[0]["content"], e.response) for e in exs] == [
        ("a", "Hi", "Hello"),
        ("b", "Q", "R"),
    ]
    assert [(e.extra["label"], e.extra["source"]) for e in exs] == [(1, "web"), (0, "book")]


def test_dataframe_generator_iterable_dataset_and_dataset_dict():
    check(load_examples(pd.DataFrame(FLAT)))
    check(load_examples(dict(r) for r in FLAT))  # a generator
    check(load_examples(iter(FLAT)))
    check(load_examples(datasets.Dataset.from_list(FLAT).to_iterable_dataset()))
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(FLAT), test=datasets.Dataset.from_list(FLAT[:1])
    )
    check(load_examples(dd, split="train"))
    assert [e.id for e in load_examples(dd, split="test")] == ["a"]
    with pytest.raises(ValueError, match="no split given; pass split= one of 'train', 'test'"):
        load_examples(dd)
    with pytest.raises(ValueError, match="no split 'dev'; pass split= one of 'train', 'test'"):
        load_examples(dd, split="dev")
    check(load_examples(datasets.DatasetDict(train=datasets.Dataset.from_list(FLAT))))  # only one
    with pytest.raises(ValueError, match="split='test' applies to a DatasetDict or an hf://"):
        load_examples(FLAT, split="test")  # never silently the whole source


def test_dataframe_missing_cells_are_missing_fields_and_ids_are_plain():
    frame = pd.DataFrame(
        [
            {"id": 7, "prompt": "Hi", "response": "Hello", "system": None},
            {"id": 8, "prompt": "Q", "response": "R", "system": "Be brief."},
        ]
    )
    a, b = load_examples(frame)
    assert (a.id, b.id) == ("7", "8")
    assert a.messages[0]["role"] == "user"  # NaN system: no system message
    assert b.messages[0] == {"role": "system", "content": "Be brief."}
    with pytest.raises(DataError, match=re.escape("DataFrame, row 1, field 'response': missing")):
        load_examples(pd.DataFrame([{"prompt": "p", "response": "r"}, {"prompt": "p"}]))


def test_csv_files(tmp_path):
    f = tmp_path / "t.csv"
    with f.open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["id", "prompt", "response", "label", "source", "system"])
        w.writeheader()
        for r in FLAT:
            w.writerow({**r, "system": ""})
    exs = load_examples(f)
    assert [(e.id, e.response, e.extra["label"]) for e in exs] == [
        ("a", "Hello", "1"),
        ("b", "R", "0"),
    ]
    assert exs[0].messages[0]["role"] == "user"  # an empty cell is a missing field
    msgs = [{"role": "user", "content": "Q, with a comma"}, {"role": "assistant", "content": "R"}]
    g = tmp_path / "m.csv"
    with g.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([["id", "messages"], ["m", json.dumps(msgs)], ["bad", "[{"]])
    with pytest.raises(DataError, match=re.escape(f"{g}:3, field 'messages': invalid JSON")):
        load_examples(g)
    skipped: list[dict[str, str]] = []
    (m,) = load_examples(g, on_error="skip", skipped=skipped)
    assert list(m.messages) == msgs and [s["where"] for s in skipped] == [f"{g}:3"]
    p = tmp_path / "p.csv"
    p.write_text("prompt,treatment,control\nQ,T,C\n")
    assert [(x.prompt, x.treatment, x.control) for x in load_pairs(p)] == [("Q", "T", "C")]


def test_missing_path_with_a_slash_is_an_error_and_never_reaches_the_hub(monkeypatch, tmp_path):
    def no_hub(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    for fn in (load_examples, load_pairs):
        with pytest.raises(FileNotFoundError) as err:
            fn("data/train.jsonl")
        assert (
            str(err.value)
            == "data/train.jsonl: no such file (a hub dataset is named hf://owner/name)"
        )


def test_hub_datasets_need_the_explicit_form(monkeypatch):
    calls = []

    def fake_hub(name, split):  # noqa: ANN001, ANN202
        calls.append((name, split))
        return datasets.Dataset.from_list(FLAT)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    check(load_examples("hf://owner/name"))
    assert [e.id for e in load_examples("hf://owner/name", split="test")] == ["a", "b"]
    assert calls == [("owner/name", "train"), ("owner/name", "test")]


def test_bytes_that_are_not_utf8_name_file_and_line_and_can_be_skipped(tmp_path):
    good = json.dumps({"id": "ok", "prompt": "p", "response": "r"}).encode() + b"\n"
    bad = b'{"id": "bad", "prompt": "caf\xe9", "response": "r"}\n'
    f = tmp_path / "t.jsonl"
    f.write_bytes(good + bad + good.replace(b'"ok"', b'"ok2"'))
    with pytest.raises(DataError) as err:
        load_examples(f)
    col = bad.index(b"\xe9") + 1
    assert str(err.value) == f"{f}:2: not UTF-8 text (byte 0xe9 at column {col})"
    skipped: list[dict[str, str]] = []
    assert [e.id for e in load_examples(f, on_error="skip", skipped=skipped)] == ["ok", "ok2"]
    assert [s["where"] for s in skipped] == [f"{f}:2"]
    pair = json.dumps({"id": "p", "prompt": "Q", "treatment": "T", "control": "C"}).encode()
    pf = tmp_path / "p.jsonl"
    pf.write_bytes(pair + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=re.escape(f"{pf}:2: not UTF-8 text")):
        load_pairs(pf)
    pskipped: list[dict[str, str]] = []
    assert [p.id for p in load_pairs(pf, on_error="skip", skipped=pskipped)] == ["p"]
    assert [s["where"] for s in pskipped] == [f"{pf}:2"]
    j = tmp_path / "t.json"
    j.write_bytes(b'[\n{"prompt": "p",\n "response": "\xe9"}]')
    with pytest.raises(DataError, match=re.escape(f"{j}:3: not UTF-8 text")):
        load_examples(j)


def test_lone_surrogate_is_a_field_error(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"id": "s", "prompt": "x\\ud800y", "response": "r"}\n')
    with pytest.raises(DataError, match=re.escape(f"{f}:1, field 'prompt': not valid Unicode")):
        load_examples(f)


def test_a_bom_on_the_first_line_is_allowed(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps(FLAT[0]).encode() + b"\r\n")
    assert [e.id for e in load_examples(f)] == ["a"]
