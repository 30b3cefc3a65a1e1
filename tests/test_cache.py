"""Cache round trip, no-op rerun, resume, storage size, lazy views."""

import json

import pytest
import torch

import lensattr.cache as cache_mod
from lensattr import CacheError, build_cache, open_cache


def test_round_trip_manifest_and_views(tiny, train_records, tmp_path):
    cache = build_cache(
        tiny, train_records, out=tmp_path, layers=[0, 3], shard_size=5, batch_size=3, progress=False
    )
    again = open_cache(tmp_path, expect=tiny)
    m = again.manifest
    assert m["ids"] == [r["id"] for r in train_records]  # row order = file order
    assert m["layers"] == [0, 3] and m["pooling"] == "mean_response" and m["dtype"] == "bfloat16"
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
