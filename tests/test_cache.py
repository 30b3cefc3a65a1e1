"""Cache round trip, no-op rerun, resume, storage size, lazy views."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lensattr.build as cache_mod
from lensattr import CacheError, build_cache, open_cache
from lensattr.data import DataError


def test_round_trip_manifest_and_views(tiny, train_records, tmp_path):
    cache = build_cache(
        tiny, train_records, out=tmp_path, layers=[0, 3], shard_size=5, batch_size=3, progress=False
    )
    again = open_cache(tmp_path, expect=tiny)
    m = again.manifest
    assert m["ids"] == [r["id"] for r in train_records]  # row order = file order
    assert (m["layers"], m["pooling"], m["storage_dtype"]) == ([0, 3], "mean_response", "bfloat16")
    assert set(m["model"]) >= {"weights_sha256", "tokenizer_sha256", "chat_template_sha256"}
    assert m["train"]["n_examples"] == len(train_records) and len(m["shards"]) == 3
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    view = again.stat("grad", 3)
    full = torch.cat([rows for _, rows, _ in view.chunks(4)])
    assert full.shape == (len(train_records), tiny.d_model) and full.dtype == torch.bfloat16
    assert torch.equal(view[3:9], full[3:9])  # crosses a shard boundary
    assert torch.equal(view[[11, 0, 5]], full[[11, 0, 5]])
    assert torch.equal(view[-1], full[-1])
    assert torch.equal(cache.stat("grad", 3)[:], full)
    with pytest.raises(KeyError, match="layer 1"):
        again.stat("grad", 1)


def test_views_are_zero_copy(tiny, train_records, tmp_path):
    cache = build_cache(tiny, train_records, out=tmp_path, layers=[1], progress=False)
    view = cache.stat("resid_post", 1)
    a, b = view[2:4], view[2:4]
    assert a.data_ptr() == b.data_ptr()  # both view the same mapped bytes


def test_storage_is_two_bytes_per_value(tiny, train_records, tmp_path):
    build_cache(tiny, train_records, out=tmp_path, layers="all", progress=False)
    n, d, layers, stats = len(train_records), tiny.d_model, 4, 4
    shard_bytes = sum(p.stat().st_size for p in tmp_path.glob("shard-*.safetensors"))
    payload = n * layers * stats * (2 * d + 4)  # bf16 rows + one fp32 norm per row
    assert payload <= shard_bytes < payload + 16384  # + the safetensors header


def test_rerun_of_finished_build_is_a_noop(tiny, train_records, tmp_path, monkeypatch):
    build_cache(tiny, train_records, out=tmp_path, layers=[2], progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(cache_mod, "capture", lambda *a, **k: pytest.fail("recomputed"))
    build_cache(tiny, train_records, out=tmp_path, layers=[2], progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_rerun_with_other_settings_is_refused(tiny, train_records, tmp_path):
    build_cache(tiny, train_records, out=tmp_path, layers=[2], progress=False)
    with pytest.raises(CacheError, match="layers"):
        build_cache(tiny, train_records, out=tmp_path, layers=[1], progress=False)
    with pytest.raises(CacheError, match="max_length"):
        build_cache(tiny, train_records, out=tmp_path, layers=[2], max_length=64, progress=False)


def test_interrupted_build_resumes_bitwise(tiny, train_records, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    build_cache(
        tiny, train_records, out=ref, layers=[0, 2], shard_size=4, batch_size=2, progress=False
    )
    out = tmp_path / "resumed"
    real = cache_mod._build_chunk
    calls = []

    def flaky(model, out_dir, index, *args, **kwargs):
        if index == 2:
            raise KeyboardInterrupt  # killed while building the last chunk
        calls.append(index)
        return real(model, out_dir, index, *args, **kwargs)

    monkeypatch.setattr(cache_mod, "_build_chunk", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_cache(
            tiny, train_records, out=out, layers=[0, 2], shard_size=4, batch_size=2, progress=False
        )
    assert calls == [0, 1] and not (out / "manifest.json").exists()
    with pytest.raises(CacheError, match="unfinished build"):
        open_cache(out)
    monkeypatch.setattr(
        cache_mod,
        "_build_chunk",
        lambda m, o, i, *a, **k: (calls.append(i), real(m, o, i, *a, **k)),
    )
    build_cache(
        tiny, train_records, out=out, layers=[0, 2], shard_size=4, batch_size=2, progress=False
    )
    assert calls == [0, 1, 2]  # only the missing chunk was computed
    for f in ref.glob("shard-*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes()
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (ref, out))
    a["train"].pop("path", None), b["train"].pop("path", None)
    assert a == b


# ------------------------------------------------------------- sizes checked at the boundary


@pytest.mark.parametrize(
    ("kw", "problem"),
    [
        ({"batch_size": -1}, "batch_size must be a positive integer, not -1"),
        ({"batch_size": 0}, "batch_size must be a positive integer, not 0"),
        ({"batch_size": True}, "batch_size must be a positive integer"),
        ({"shard_size": -1}, "shard_size must be a positive integer, not -1"),
        ({"shard_size": 0}, "shard_size must be a positive integer"),
        ({"max_length": 0}, "max_length must be a positive integer"),
        ({"stats": []}, "stats must name at least one statistic"),
        ({"stats": ["grad", "grad"]}, "name a statistic twice"),
        ({"padding_side": "middle"}, "padding_side must be 'right' or 'left'"),
        ({"on_error": "ignore"}, "on_error must be 'raise' or 'skip'"),
        ({"storage_dtype": "int8"}, "dtype 'int8' is not one of bf16"),
        ({"layers": []}, "selects no block"),
        ({"layers": "9"}, "out of range for a model with 4 blocks"),
    ],
)
def test_sizes_and_choices_are_validated_before_any_work(
    tmp_path, tiny, train_records, kw, problem
):
    # Issue 11.1: --batch-size -1 cached zeros and --shard-size -1 cached nothing, both "finished".
    with pytest.raises(ValueError, match=problem):
        build_cache(tiny, train_records, out=tmp_path / "c", **kw)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("text", ["", "\n\n", "  \n\t\n"])
def test_an_empty_train_file_is_a_clear_error(tmp_path, tiny, text):
    train = tmp_path / "train.jsonl"
    train.write_text(text)
    with pytest.raises(DataError, match=f"{train}: no examples"):
        build_cache(tiny, train, out=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_a_train_file_of_only_bad_records_is_a_clear_error(tmp_path, tiny):
    train = tmp_path / "train.jsonl"
    train.write_text('{"id": "a"}\n')
    with pytest.raises(DataError, match=r"all 1 records are bad \(.*train\.jsonl:1"):
        build_cache(tiny, train, out=tmp_path / "c", on_error="skip")


# ------------------------------------------------------------------------- names and dtypes


@pytest.mark.parametrize(
    ("spelling", "name"),
    [
        ("bf16", "bfloat16"),
        ("BFloat16", "bfloat16"),
        ("fp16", "float16"),
        ("float32", "float32"),
        ("fp32", "float32"),
        (torch.float32, "float32"),
        (torch.bfloat16, "bfloat16"),
    ],
)
def test_storage_dtype_spellings(tmp_path, tiny, train_records, spelling, name):
    cache = build_cache(tiny, train_records[:2], out=tmp_path, layers=[1], storage_dtype=spelling)
    assert cache.manifest["storage_dtype"] == name
    assert cache.stat("grad", 1)[:].dtype == getattr(torch, name)


def test_layers_negative_ranges_and_hook_names():
    from lensattr.layers import parse_layers

    assert parse_layers(-1, 30) == [29]
    assert parse_layers("-1", 30) == [29]
    assert parse_layers("-3:", 30) == [27, 28, 29]
    assert parse_layers(":2", 30) == [0, 1]
    assert parse_layers("20:30", 30) == list(range(20, 30))
    assert parse_layers("0:30:10", 30) == [0, 10, 20]
    assert parse_layers([range(2), slice(-1, None)], 30) == [0, 1, 29]
    assert parse_layers("blocks.12.hook_resid_post", 30) == [12]
    # TransformerLens: block l's input is block l-1's output
    assert parse_layers(["blocks.3.hook_resid_pre", "blocks.29.hook_resid_post", 5], 30) == [
        2,
        29,
        5,
    ]
    assert parse_layers("7,blocks.1.hook_resid_post,2:4", 30) == [7, 1, 2, 3]
    assert parse_layers("all", 3) == [0, 1, 2]
    for bad, why in (
        ("20:40", "out of range"),
        ("blocks.30.hook_resid_post", "out of range"),
        ("blocks.2.hook_banana", "unknown hook name hook_banana"),
        ("blocks.2.hook_mlp_out", "inside block 2"),
        ("blocks.0.hook_resid_pre", "the embeddings"),
        ("blocks.-1.hook_resid_post", "not a block index"),
        ("blocks.12", "not a block index"),
        ("hook_mlp_out", "not a block index"),
        ("x", "not a block index"),
        (-31, "out of range"),
        ("1,blocks.2.hook_resid_pre", "layer 1 twice"),
        ("::0", "step cannot be 0"),
        ("5:2", "selects no block"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_layers(bad, 30)


def test_stat_takes_negative_layers_and_hook_names(tiny, train_records, tmp_path):
    cache = build_cache(tiny, train_records[:3], out=tmp_path, layers=[1, 3])
    last = cache.stat("grad", 3)[:]
    assert torch.equal(cache.stat("grad", -1)[:], last)
    assert torch.equal(cache.stat("grad", "blocks.3.hook_resid_post")[:], last)
    assert cache.layer("blocks.1.hook_resid_post") == 1
    with pytest.raises(KeyError, match=r"layer -2 is not in this cache \(it has \[1, 3\]\)"):
        cache.stat("grad", -2)


def test_model_mismatch_names_the_models(tiny, train_records, tmp_path):
    from lensattr import load_model
    from lensattr.testing import tiny_hf_model, tiny_tokenizer

    cache = build_cache(tiny, train_records[:2], out=tmp_path, layers=[1])
    other = load_model(tiny_hf_model(seed=1), tiny_tokenizer())
    fp = {**other.fingerprint(), "name": "my-finetune"}
    with pytest.raises(
        CacheError, match=r"model: cache built with 'tiny-random', not 'my-finetune'"
    ):
        cache.check({"model": fp})
    name = other.fingerprint()["name"]
    with pytest.raises(CacheError, match=rf"model: cache built with 'tiny-random', not '{name}'"):
        cache.check(other)
    same_name = {**other.fingerprint(), "name": "tiny-random"}
    with pytest.raises(CacheError, match=r"another 'tiny-random' \(same name, other files\)"):
        cache.check({"model": same_name})


def test_views_give_float32_numpy(tiny, train_records, tmp_path):
    import numpy as np

    cache = build_cache(tiny, train_records, out=tmp_path, layers=[1], shard_size=5)
    view = cache.stat("resid_post", 1)
    want = view[:].float().numpy()
    assert view.numpy().dtype == np.float32 and np.array_equal(view.numpy(), want)
    arr = np.asarray(view)
    assert arr.dtype == np.float32 and arr.shape == (12, tiny.d_model)
    assert np.array_equal(arr, want)
    assert np.asarray(view, dtype=np.float64).dtype == np.float64


# ---------------------------------------------------------------- the cache's own records


def _records_with_extras(train_records):
    recs = [dict(r) for r in train_records]
    for k, r in enumerate(recs):
        r["label"] = k % 2
        r["source"] = {"origin": f"set-{k % 3}"}
    return recs


def test_records_are_kept_in_the_cache_and_checked(tmp_path, tiny, train_records):
    # Issue 12.2: rank re-read the training file from its old path (moved: fail; edited: wrong).
    recs = _records_with_extras(train_records)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cache = build_cache(tiny, train, out=tmp_path / "c", layers=[1], shard_size=5)
    train.write_text("")  # edited...
    train.unlink()  # ... then removed: the cache does not need it
    cache = open_cache(tmp_path / "c")
    got = cache.records(["ex-sys", "ex3"])
    assert [r["id"] for r in got] == ["ex-sys", "ex3"]
    assert got[0]["messages"] == recs[-1]["messages"]
    assert got[1]["messages"][-1] == {"role": "assistant", "content": recs[3]["response"]}
    assert got[1]["label"] == 1 and got[1]["source"] == {"origin": "set-0"}
    assert [r["id"] for r in cache.records()] == cache.ids
    (ex,) = cache.examples(["ex4"])
    assert ex.id == "ex4" and ex.response == recs[4]["response"] and ex.extra["label"] == 0
    with pytest.raises(KeyError, match="'nope' is not in this cache"):
        cache.records(["nope"])
    gz = tmp_path / "c" / "records.jsonl.gz"
    blob = bytearray(gz.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    gz.write_bytes(bytes(blob))
    with pytest.raises(CacheError, match=r"records\.jsonl\.gz: checksum mismatch"):
        cache.records(["ex3"])


def test_a_system_prompt_is_kept_once(tmp_path, tiny):
    rec = {"id": "s", "system": "Be brief.", "prompt": "Hi", "response": "Yo", "label": 1}
    cache = build_cache(tiny, [rec], out=tmp_path, layers=[1])
    (got,) = cache.records()
    assert got == {
        "id": "s",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"},
        ],
        "label": 1,
    }


def test_records_of_a_list_and_a_dataset(tmp_path, tiny, train_records):
    import datasets

    recs = _records_with_extras(train_records[:4])
    for name, source in [("list", recs), ("ds", datasets.Dataset.from_list(recs[:3]))]:
        cache = build_cache(tiny, source, out=tmp_path / name, layers=[1])
        got = cache.records()
        assert [r["id"] for r in got] == [r["id"] for r in recs[: len(got)]]
        assert [r["label"] for r in got] == [r["label"] for r in recs[: len(got)]]


def test_records_copy_is_deterministic(tmp_path, tiny, train_records):
    a = build_cache(tiny, train_records, out=tmp_path / "a", layers=[1])
    b = build_cache(tiny, train_records, out=tmp_path / "b", layers=[1])
    ga, gb = (c.path / "records.jsonl.gz" for c in (a, b))
    assert ga.read_bytes() == gb.read_bytes()
    assert a.manifest["records"]["sha256"] == b.manifest["records"]["sha256"]


# ------------------------------------------------------------------ property: records copy

_any_text = st.text(
    st.characters(codec=None, exclude_categories=()), max_size=40
) | st.sampled_from(
    ["<|im_end|>", "<|im_start|>assistant\n", "\x00", "\ud800", "\r\n", "\u2028", "é" * 30]
)
_extra = st.dictionaries(
    st.sampled_from(["label", "source", "meta", "score"]),
    st.none() | st.booleans() | st.integers() | _any_text | st.lists(st.integers(), max_size=3),
    max_size=3,
)


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(st.tuples(_any_text, _any_text, _extra), min_size=1, max_size=6),
)
def test_records_copy_round_trips_any_text(tmp_path_factory, texts):
    from lensattr.data import Example
    from lensattr.store.records import read_records, record_of, write_records

    exs = [
        Example(
            id=f"r{i}-{p[:5]}",
            messages=({"role": "user", "content": p}, {"role": "assistant", "content": r}),
            extra={**extra, "_where": "ignored"},
        )
        for i, (p, r, extra) in enumerate(texts)
    ]
    d = tmp_path_factory.mktemp("rec")
    a = write_records(d / "a.jsonl.gz", exs)
    b = write_records(d / "b.jsonl.gz", exs)
    assert a["sha256"] == b["sha256"] and a["n"] == len(exs)  # same records, same bytes
    got = read_records(d / "a.jsonl.gz", a["sha256"], None)
    assert got == [record_of(ex) for ex in exs]
    assert "_where" not in got[0]
    ids = [ex.id for ex in reversed(exs)]
    assert [r["id"] for r in read_records(d / "a.jsonl.gz", a["sha256"], ids)] == ids


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(
        st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=4, max_size=64
    ).filter(lambda v: len(v) % 4 == 0),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
)
def test_nonfinite_rows_agrees_with_isfinite(values, dtype):
    from lensattr.store.shards import nonfinite_rows

    t = torch.tensor(values, dtype=torch.float32).to(dtype).view(-1, 4)
    want = (~torch.isfinite(t)).any(1).nonzero()[:, 0].tolist()  # fp16 overflow included
    assert nonfinite_rows(t) == want
    assert (
        nonfinite_rows(t.reshape(-1)) == (~torch.isfinite(t.reshape(-1))).nonzero()[:, 0].tolist()
    )


def test_a_gradient_free_build_runs_no_backward(tiny, train_records, tmp_path, monkeypatch):
    """Only forward statistics asked for: no backward at all (issue 14, item 2), and the rows
    are the gradient build's."""
    full = build_cache(tiny, train_records, out=tmp_path / "g", layers=[1, 3], progress=False)
    calls: list[str] = []

    def refuse(*args, **kwargs):
        calls.append("backward")
        raise AssertionError("a gradient-free build ran a backward")

    monkeypatch.setattr(torch.autograd, "backward", refuse)
    monkeypatch.setattr(torch.autograd, "grad", refuse)
    # The guard works: the same build with a gradient statistic now fails.
    with pytest.raises(Exception, match="ran a backward"):
        build_cache(
            tiny, train_records, out=tmp_path / "x", layers=[3], stats=["grad"], progress=False
        )
    calls.clear()
    fwd = build_cache(
        tiny, train_records, out=tmp_path / "f", layers=[1, 3], stats=["resid_post"], progress=False
    )
    assert calls == []
    for layer in (1, 3):
        assert torch.equal(fwd.stat("resid_post", layer)[:], full.stat("resid_post", layer)[:])


def test_reuse_copies_the_rows_it_holds_and_captures_only_the_rest(
    tiny, train_records, tmp_path, monkeypatch
):
    """``build_cache(reuse=...)`` (the cheap path's sample, issue 14): rows of examples the
    other cache holds with the same messages are copied bitwise, every other example is
    captured, and a cache with other settings or without the rows is refused."""
    sample_recs = [train_records[i] for i in (0, 3, 7, 9)]
    sample = build_cache(tiny, sample_recs, out=tmp_path / "s", layers=[1, 3], progress=False)
    changed = [dict(r) for r in train_records]
    changed[9]["response"] = "a different reply"  # same id, other messages: captured
    captured: list[int] = []
    real = cache_mod.capture

    def counting(model, batch, *args, **kwargs):
        captured.append(batch.input_ids.shape[0])
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(cache_mod, "capture", counting)
    got = build_cache(
        tiny,
        changed,
        out=tmp_path / "r",
        layers=[3],
        stats=["resid_post"],
        reuse=sample,
        shard_size=5,
        progress=False,
    )
    assert sum(captured) == len(changed) - 3
    monkeypatch.undo()
    fresh = build_cache(
        tiny, changed, out=tmp_path / "f", layers=[3], stats=["resid_post"], progress=False
    )
    rows, fresh_rows = got.stat("resid_post", 3)[:], fresh.stat("resid_post", 3)[:]
    for i, rec in enumerate(changed):
        if rec["id"] in ("ex0", "ex3", "ex7"):
            j = sample.ids.index(rec["id"])
            assert torch.equal(rows[i], sample.stat("resid_post", 3)[j])
        else:
            assert torch.equal(rows[i], fresh_rows[i])
    assert torch.allclose(rows.float(), fresh_rows.float(), atol=1e-2)  # bf16 rounding
    with pytest.raises(CacheError, match="cannot be reused.*max_length"):
        build_cache(tiny, changed, out=tmp_path / "x", layers=[3], max_length=64, reuse=sample)
    with pytest.raises(CacheError, match="lacks resid_post at layer 2"):
        build_cache(
            tiny, changed, out=tmp_path / "y", layers=[2], stats=["resid_post"], reuse=sample
        )


def test_the_plain_tensor_writer_writes_what_a_build_writes(tmp_path, tiny, train_records):
    """write_cache of a build's own rows gives byte-identical shards, and a cache every reader
    opens: the layout is the store's alone, not the build loop's."""
    from lensattr.config import CaptureConfig
    from lensattr.store.cache import write_cache

    built = build_cache(
        tiny, train_records[:5], out=tmp_path / "built", layers=[1, 2], shard_size=2,
        stats=["resid_post", "grad"], progress=False,
    )  # fmt: skip
    rows = {s: {la: built.stat(s, la)[:] for la in built.layers} for s in built.stats}
    written = write_cache(
        tmp_path / "written",
        built.ids,
        rows,
        model=built.manifest["model"],
        config=built.capture_config,
        shard_size=2,
        examples=built.examples(),
    )
    assert [s["sha256"] for s in written.manifest["shards"]] == [
        s["sha256"] for s in built.manifest["shards"]
    ]
    assert written.manifest["records"]["sha256"] == built.manifest["records"]["sha256"]
    written.verify()
    for s in built.stats:
        assert torch.equal(written.stat(s, 2)[:], rows[s][2])
        assert torch.equal(written.stat(s, 2).norms, built.stat(s, 2).norms)
    assert isinstance(written.capture_config, CaptureConfig)
    with pytest.raises(ValueError, match=r"rows\['grad'\]\[1\] is \(4, 32\), not \(5, 32\)"):
        write_cache(
            tmp_path / "bad", built.ids, {"grad": {1: rows["grad"][1][:4]}}, model={"name": "x"}
        )
