"""One CaptureConfig, recorded end to end: manifest, pair statistics, saved query, rank, explain,
and the command line's flags (generated from the dataclass, so their defaults cannot drift)."""

import dataclasses
import inspect
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lensattr import CaptureConfig, behavior_query, build_cache, explain, pair_stats, rank
from lensattr.cli import build_parser
from lensattr.config import MATCHED, check_capture, from_arguments
from lensattr.query import PairStats, Query, QueryError
from lensattr.store.cache import CacheError, open_cache, write_manifest

LAYERS = [1, 2]


@pytest.fixture(scope="module")
def cache64(tiny, train_records, tmp_path_factory):
    out = tmp_path_factory.mktemp("c64")
    return build_cache(
        tiny,
        train_records[:6],
        out=out,
        layers=LAYERS,
        max_length=64,
        padding_side="left",
        storage_dtype="fp32",
        progress=False,
    )


def test_the_manifest_records_the_config(cache64):
    want = CaptureConfig(layers=LAYERS, max_length=64, padding_side="left", storage_dtype="float32")
    assert cache64.capture_config == want
    m = json.loads((cache64.path / "manifest.json").read_text())  # under the fields' own names
    assert {k: m[k] for k in want.to_manifest()} == {
        "layers": [1, 2],
        "max_length": 64,
        "padding_side": "left",
        "pooling": "mean_response",
        "storage_dtype": "float32",
    }
    assert CaptureConfig.from_manifest(m, what="the manifest") == want


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(CaptureConfig)])
def test_a_manifest_without_a_capture_field_is_refused_naming_it(cache64, tmp_path, name):
    # nothing was released: no default fills a missing field, no other spelling is read
    out = tmp_path / "c"
    shutil.copytree(cache64.path, out)
    m = json.loads((out / "manifest.json").read_text())
    value = m.pop(name)
    if name == "storage_dtype":
        m["dtype"] = value  # its former key is not read either
    write_manifest(out, m)  # checksum recomputed: only the missing field is wrong
    want = rf"manifest\.json: corrupt manifest \(the manifest lacks '{name}'\)"
    with pytest.raises(CacheError, match=want):
        open_cache(out)
    with pytest.raises(ValueError, match=f"the manifest lacks '{name}'$"):
        CaptureConfig.from_manifest(m, what="the manifest")


def test_build_cache_takes_a_config(cache64, tiny, train_records, monkeypatch):
    import lensattr.build as cache_mod

    cfg = CaptureConfig(layers=LAYERS, max_length=64, padding_side="left", storage_dtype="fp32")
    monkeypatch.setattr(cache_mod, "capture", lambda *a, **k: pytest.fail("recomputed"))
    again = build_cache(tiny, train_records[:6], out=cache64.path, config=cfg, progress=False)
    assert again is not None and again.capture_config == cache64.capture_config
    with pytest.raises(ValueError, match="config= and max_length="):
        build_cache(tiny, train_records, out=cache64.path, config=cfg, max_length=32)


def test_pair_stats_and_saved_query_round_trip_the_config(tiny, pair_records, tmp_path):
    ps = pair_stats(tiny, pair_records, layers=LAYERS, max_length=64, padding_side="left")
    want = CaptureConfig(layers=LAYERS, max_length=64, padding_side="left", storage_dtype="fp32")
    assert ps.capture == want
    ps.save(tmp_path / "ps.safetensors")
    assert PairStats.load(tmp_path / "ps.safetensors").capture == want
    q = behavior_query(None, ps)
    assert q.capture == want
    q.save(tmp_path / "q.safetensors")
    assert Query.load(tmp_path / "q.safetensors").capture == want


def _rewrite_meta(path, **meta):
    with safe_open(str(path), framework="pt") as fh:
        old = fh.metadata()
    new = {k: v for k, v in {**old, **meta}.items() if v is not None}
    save_file(load_file(str(path)), str(path), new)


def test_a_saved_query_records_every_capture_field(tiny, pair_records, tmp_path):
    path = tmp_path / "q.safetensors"
    q = behavior_query(tiny, pair_records, layers=LAYERS, max_length=64)
    q.save(path)
    record = json.loads(Query.load(path).metadata()["capture"])
    assert record == CaptureConfig(layers=LAYERS, max_length=64, storage_dtype="fp32").to_manifest()
    # nothing was released: a record missing a field (or the record itself) is refused, not filled
    _rewrite_meta(path, capture=json.dumps({"max_length": 64, "padding_side": "right"}))
    with pytest.raises(
        QueryError, match="field 'capture' lacks 'layers', 'pooling', 'storage_dtype'"
    ):
        Query.load(path)
    _rewrite_meta(path, capture=None)
    with pytest.raises(QueryError, match="not a lensattr query \\(KeyError: 'capture'\\)"):
        Query.load(path)
    _rewrite_meta(path, capture=json.dumps({**record, "padding_side": "middle"}))
    with pytest.raises(QueryError, match="padding_side must be 'right' or 'left'"):
        Query.load(path)
    q.capture = None  # not recorded: saved as {}, read back as None (checked against nothing)
    q.save(path)
    assert Query.load(path).capture is None


def test_rank_refuses_a_query_at_another_max_length(cache64, tiny, pair_records):
    q = behavior_query(tiny, pair_records, layers=LAYERS, max_length=128, padding_side="left")
    with pytest.raises(CacheError, match="max_length=128, the cache with max_length=64"):
        rank(cache64, q, layer=2)
    q = behavior_query(tiny, pair_records, layers=LAYERS, max_length=64)  # right padding
    with pytest.raises(CacheError, match="padding_side='right', the cache with padding_side='l"):
        rank(cache64, q, layer=2)
    ok = behavior_query(tiny, pair_records, layers=LAYERS, max_length=64, padding_side="left")
    assert len(rank(cache64, ok, layer=2, top_k=3)) == 3


def test_explain_refuses_a_query_at_another_max_length(tiny, pair_records):
    q = behavior_query(tiny, pair_records, layers=[2], max_length=128)
    ex = {"id": "x", "prompt": "Q", "response": "Sure"}
    with pytest.raises(QueryError, match="max_length=128, this explain with max_length=512"):
        explain(tiny, ex, q, 2)
    by_keyword = explain(tiny, ex, q, 2, max_length=128)
    by_config = explain(tiny, ex, q, 2, config=CaptureConfig(max_length=128))
    assert len(by_keyword.tokens) > 0 and torch.equal(
        by_keyword.contributions, by_config.contributions
    )
    with pytest.raises(ValueError, match="explain got config= and max_length="):
        explain(tiny, ex, q, 2, max_length=128, config=CaptureConfig(max_length=128))


def test_check_capture_names_field_and_both_values():
    a, b = CaptureConfig(), CaptureConfig(max_length=None)
    with pytest.raises(ValueError, match="the pairs were captured with max_length=512, the c"):
        check_capture(a, b, what="the pairs", other="the cache")
    check_capture(None, b, what="the pairs", other="the cache")  # nothing recorded
    check_capture(a, CaptureConfig(layers=[3], storage_dtype="fp16"), what="x", other="y")
    assert MATCHED == ("max_length", "padding_side", "pooling")


@pytest.mark.parametrize(
    "argv",
    [
        ["cache", "--train", "t.jsonl", "--out", "c"],
        ["query", "--pairs", "p.jsonl", "--out", "q.safetensors"],
    ],
)
def test_cli_defaults_are_the_dataclass_defaults(argv):
    args = build_parser().parse_args(argv)
    for f in dataclasses.fields(CaptureConfig):
        if f.metadata.get("cli", True) and hasattr(args, f.name):
            assert getattr(args, f.name) == f.default, f.name
    assert from_arguments(args, storage_dtype="bfloat16") == CaptureConfig()


def test_cli_flags_reach_the_config():
    argv = ["cache", "--train", "t", "--out", "c", "--layers", "1,2", "--max-length", "none"]
    argv += ["--padding-side", "left", "--storage-dtype", "fp32"]
    cfg = from_arguments(build_parser().parse_args(argv))
    assert cfg == CaptureConfig(
        layers="1,2", max_length=None, padding_side="left", storage_dtype="fp32"
    )
    sub = build_parser()._subparsers._group_actions[0].choices["cache"]  # type: ignore[union-attr]
    help_text = " ".join(sub.format_help().split())
    assert "(default: 512)" in help_text and "--storage-dtype" in help_text


@pytest.mark.parametrize("fn", ["build_cache", "pair_stats", "behavior_query"])
def test_api_defaults_are_the_dataclass_defaults(fn):
    import lensattr

    params = inspect.signature(getattr(lensattr, fn)).parameters
    for f in dataclasses.fields(CaptureConfig):
        if f.name in params:
            assert params[f.name].default == f.default, (fn, f.name)


def test_bad_settings_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="max_length must be a positive integer, not 0"):
        CaptureConfig(max_length=0)
    with pytest.raises(ValueError, match="pooling must be a non-empty name, not ''"):
        CaptureConfig(pooling="")
    with pytest.raises(ValueError, match="dtype 'int8' is not one of"):
        CaptureConfig(storage_dtype="int8")
    assert CaptureConfig(storage_dtype=torch.float16).storage_dtype == "float16"


def test_a_statistic_brings_its_own_pooling(tiny, train_records, pair_records, tmp_path):
    """Pooling is an attribute of a statistic (``register_stat(pooling=...)``): the cache and the
    query record it, statistics that pool differently are not captured together, ``rank``
    refuses a query of another pooling and ``explain`` a statistic it cannot split by token."""
    from lensattr.registry import STAT, register_stat

    @register_stat("last_reply_token", needs_grad=False, pooling="last_token")
    def last_reply_token(acts):
        last = acts.mask.float().cumsum(1).argmax(1)  # the last reply position of each row
        return acts.z_out[torch.arange(len(last)), last]

    try:
        cache = build_cache(
            tiny, train_records, out=tmp_path / "c", layers=[2], stats=["last_reply_token"]
        )
        assert cache.manifest["pooling"] == "last_token"
        assert cache.capture_config.pooling == "last_token"
        with pytest.raises(ValueError, match=r"residual_change \(mean_response\), last_reply"):
            build_cache(
                tiny,
                train_records,
                out=tmp_path / "mixed",
                layers=[2],
                stats=["residual_change", "last_reply_token"],
            )
        last = pair_stats(tiny, pair_records, stats=["last_reply_token"], layers=[2])
        assert last.capture.pooling == "last_token"
        query = behavior_query(None, last, query="contrast", stat="last_reply_token")
        assert len(rank(cache, query, layer=2, top_k=3)) == 3  # same pooling: ranked
        mean = pair_stats(tiny, pair_records, stats=["resid_post"], layers=[2])
        other = behavior_query(None, mean, query="contrast", stat="resid_post")
        refused = "pooling='mean_response', the cache with pooling='last_token'"
        with pytest.raises(CacheError, match=refused):
            rank(cache, other, layer=2, stat="last_reply_token")
        with pytest.raises(QueryError, match="pools by 'last_token'"):
            explain(tiny, train_records[0], query, 2)
    finally:
        STAT.pop("last_reply_token", None)


def test_bench_config_generates_the_bench_cli():
    """Every BenchConfig field is a ``lensattr bench`` flag with the field's default, and the
    flags parse back into the same BenchConfig: no default is copied by hand."""
    from lensattr.bench.run import BenchConfig

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["bench"]  # type: ignore[union-attr]
    dests = {a.dest for a in sub._actions}
    assert {f.name for f in dataclasses.fields(BenchConfig)} <= dests
    assert from_arguments(parser.parse_args(["bench"]), config=BenchConfig) == BenchConfig()
    argv = ["bench", "--behaviours", "a,b", "--n-clean", "none", "--max-plants", "7"]
    argv += ["--no-persona", "--trak", "--ft-seeds", "3,4", "--ft-lr", "0.001"]
    argv += ["--ft-behaviours", "medhallu", "--methods", "contrast|grad|dot"]
    got = from_arguments(parser.parse_args(argv), config=BenchConfig)
    assert got == BenchConfig(
        behaviours=["a", "b"],
        n_clean=None,
        max_plants=7,
        persona=False,
        trak=True,
        ft_seeds=[3, 4],
        ft_lr=0.001,
        ft_behaviours=["medhallu"],
        methods=["contrast|grad|dot"],
    )


def test_pair_stats_takes_a_config(tiny, pair_records):
    cfg = CaptureConfig(layers=LAYERS, max_length=64, padding_side="left")
    stats = ["resid_post", "residual_change"]
    by_config = pair_stats(tiny, pair_records, stats=stats, config=cfg, progress=False)
    by_keywords = pair_stats(
        tiny,
        pair_records,
        stats=stats,
        layers=LAYERS,
        max_length=64,
        padding_side="left",
        progress=False,
    )
    assert (
        by_config.capture
        == by_keywords.capture
        == dataclasses.replace(cfg, storage_dtype="float32")
    )
    for stat in stats:
        for layer in LAYERS:
            for a, b in zip(
                by_config.sides(stat, layer), by_keywords.sides(stat, layer), strict=True
            ):
                assert torch.equal(a, b), (stat, layer)  # bitwise
    q_config = behavior_query(tiny, pair_records, config=cfg, progress=False)
    q_keywords = behavior_query(
        tiny, pair_records, layers=LAYERS, max_length=64, padding_side="left", progress=False
    )
    assert q_config.capture == q_keywords.capture
    assert all(torch.equal(q_config.vector(la), q_keywords.vector(la)) for la in LAYERS)


@pytest.mark.parametrize("step", [pair_stats, behavior_query])
def test_a_config_and_a_keyword_conflict_as_in_build_cache(step, tiny, pair_records):
    cfg = CaptureConfig(layers=LAYERS, max_length=64)
    name = step.__name__
    with pytest.raises(ValueError, match=f"^{name} got config= and max_length=: give the capture"):
        step(tiny, pair_records, config=cfg, max_length=32)
    with pytest.raises(ValueError, match=f"^{name} got config= and layers, padding_side=: give"):
        step(tiny, pair_records, config=cfg, layers=[1], padding_side="left")
    # a keyword left at its default (spelled out or not) defers to the config, as in build_cache
    got = step(tiny, pair_records, config=cfg, max_length=512, progress=False)
    assert got.capture is not None and got.capture.max_length == 64


def test_select_then_cache_takes_a_config(tmp_path):
    from lensattr import select_then_cache

    with pytest.raises(ValueError, match="^select_then_cache got config= and max_length="):
        select_then_cache(None, [], [], out=tmp_path, config=CaptureConfig(), max_length=32)
