"""The numeric boundary (issue 26): the parameters of ``rank`` / ``select``, what registered
functions return, pair quality, names that reach paths, and the CLI's outputs. Each case is a
right result or a one-line error, never a silently wrong one; each test failed before its fix.
The hypothesis tests at the end push random ``rows``, ``chunk_rows``, ``top_k``, layers, block
sizes and registered scores of random output shapes through ``rank`` and ``select``, asserting
a ranking equal to a brute-force reference (order included) or a one-line error.
"""

import importlib
import inspect
import json
import math
import os
import resource
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_registry import install_plugin

import lensattr
from lensattr import registry
from lensattr.build import build_cache
from lensattr.cli import main
from lensattr.data import DataError
from lensattr.methods import pool
from lensattr.moments import ScoreContext, pool_moments
from lensattr.query import PairStats, Query, QueryError, behavior_query, pair_stats
from lensattr.registry import MethodError, get_score
from lensattr.store.cache import SCHEMA_VERSION, CacheError, open_cache, write_manifest
from lensattr.store.shards import describe_shard, tensor_key, write_shard

RANK = importlib.import_module("lensattr.rank")  # the module (lensattr.rank is the function)
MODEL = {"name": "synthetic", "weights_sha256": "0", "tokenizer_sha256": "0",
         "chat_template_sha256": "0"}  # fmt: skip
N, D = 23, 16  # rows of 64 bytes: every block of a fresh fp32 buffer starts 64-byte aligned
LAYERS = (0, 1)


def unchecked(fn):  # noqa: ANN001, ANN201
    """``fn`` without the suite's run-time type checks (jaxtyping + beartype), as users call it:
    some values these tests pass have the wrong type on purpose, to reach lensattr's checks."""
    return inspect.unwrap(fn)


def one_line(err: BaseException, *needles: str) -> str:
    text = str(err)
    assert text and "\n" not in text, repr(text)
    for needle in needles:
        assert needle in text, text
    return text


def cli_error(capsys, code: int, *needles: str) -> str:  # noqa: ANN001
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def hand_cache(path: Path, rows: dict[int, torch.Tensor], *, stat: str = "hand", shard_rows=5):
    """A float32 cache of the given rows (``{layer: [n, d]}``), in shards of ``shard_rows``."""
    path.mkdir(parents=True)
    n, d = next(iter(rows.values())).shape
    ids = [f"r{i}" for i in range(n)]
    shards = []
    for k, start in enumerate(range(0, n, shard_rows)):
        stop = min(start + shard_rows, n)
        tensors = {}
        for layer, mat in rows.items():
            part = mat[start:stop].float().contiguous()
            tensors[tensor_key(stat, layer)] = part
            tensors[tensor_key(stat, layer) + "/norm"] = part.norm(dim=1)
        name = f"shard-{k:05d}.safetensors"
        digest = write_shard(path / name, tensors, metadata={"ids": json.dumps(ids[start:stop])})
        shards.append({"file": name, "first_row": start, "n_rows": stop - start,
                       "sha256": digest, **describe_shard(path / name)})  # fmt: skip
    write_manifest(
        path,
        {
            "schema_version": SCHEMA_VERSION,
            "lensattr_version": lensattr.__version__,
            "model": MODEL,
            "n_layers": max(rows) + 1,
            "stats": [stat],
            "layers": sorted(rows),
            "max_length": 512,
            "padding_side": "right",
            "pooling": "mean_response",
            "storage_dtype": "float32",
            "shard_size": shard_rows,
            "d_model": d,
            "n_rows": n,
            "ids": ids,
            "shards": shards,
            "train": {},
            "skipped": [],
        },
    )
    return open_cache(path)


def unit(v: torch.Tensor) -> torch.Tensor:
    return (v.double() / v.double().norm()).float()


@pytest.fixture(scope="module")
def hrows() -> dict[int, torch.Tensor]:
    """Random rows with bitwise duplicates (2 = 5 = 17, 9 = 20) and a zero row (11)."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for layer in LAYERS:
        m = torch.randn(N, D, generator=gen) + 2.0 * torch.randn(D, generator=gen)
        m[5] = m[17] = m[2]
        m[20] = m[9]
        m[11] = 0.0
        out[layer] = m
    return out


@pytest.fixture(scope="module")
def hcache(tmp_path_factory, hrows):
    return hand_cache(tmp_path_factory.mktemp("hand") / "c", hrows)


@pytest.fixture(scope="module")
def hquery():
    gen = torch.Generator().manual_seed(1)
    vecs = {la: unit(torch.randn(D, generator=gen)) for la in LAYERS}
    return Query(vectors=vecs, rule="contrast", stat="hand", model=MODEL, n_pairs=6)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny, train_records, pair_records):
    """A cache of the tiny model (layers 1 and 3), its records file, a saved query, the pairs."""
    root = tmp_path_factory.mktemp("built")
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in train_records))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_records))
    cache = build_cache(tiny, train, out=root / "c", layers=[1, 3], progress=False)
    q = behavior_query(tiny, pair_records, layers=[1, 3], progress=False)
    q.save(root / "q.safetensors")
    return {"root": root, "train": train, "pairs": pairs, "cache": cache, "query": q}


# ------------------------------------------------- registered test scores (row-local or broken)


def _rowcos(rows, norms, query, ctx=None):  # noqa: ANN001, ANN202
    """A row-local cosine: NaN for a zero row (0 / 0), so non-finite scores are exercised."""
    return (rows * query).sum(1) / (norms * query.norm())


BAD_SHAPES = {
    "bnd_scalar": lambda rows, norms, query, ctx=None: (rows @ query).sum(),
    "bnd_one": lambda rows, norms, query, ctx=None: (rows @ query)[:1],
    "bnd_column": lambda rows, norms, query, ctx=None: (rows @ query)[:, None],
    "bnd_longer": lambda rows, norms, query, ctx=None: torch.cat([rows @ query, torch.zeros(1)]),
    "bnd_int": lambda rows, norms, query, ctx=None: (rows @ query).long(),
    "bnd_list": lambda rows, norms, query, ctx=None: (rows @ query).tolist(),
}
GOOD_SCORES = ["cosine", "dot", "centered_cosine", "whitened_cosine",
               "deflated_cosine", "bnd_rowcos"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def test_scores():
    registry.register_score("bnd_rowcos")(_rowcos)
    for name, fn in BAD_SHAPES.items():
        registry.register_score(name)(fn)
    yield
    for name in ["bnd_rowcos", *BAD_SHAPES]:
        registry.SCORE.pop(name, None)


def reference(cache, q, layers, score, keep, top_k, bottom, block=1024):  # noqa: ANN001, ANN201
    """The ranking by brute force: every row scored (a score is a function of the row's block
    of ``block`` rows from row 0), the mean over the layers, one stable sort of the kept rows
    (higher first, or lower with ``bottom``; non-finite last; ties by row)."""
    rule = get_score(score)
    s = torch.zeros(len(cache))
    for la in layers:
        view = cache.stat("hand", la)
        x, norms = view[:].to(torch.float32, copy=True), view.norms
        ctx = ScoreContext(cache, "hand", la)
        s += torch.cat(
            [
                rule.fn(x[a : a + block], norms[a : a + block], q.vector(la), ctx).float()
                for a in range(0, len(cache), block)
            ]  # fmt: skip
        )
    s /= len(layers)
    kept = torch.arange(len(cache)) if keep is None else keep
    key = (-s if bottom else s)[kept]
    key = key.masked_fill(~torch.isfinite(key), -torch.inf)
    order = torch.sort(-key, stable=True).indices[: top_k or len(kept)]
    out = kept[order]
    return out, torch.where(torch.isfinite(s[out]), s[out], torch.nan)


def same_ranking(r, rows_ref, scores_ref) -> None:  # noqa: ANN001
    assert r.rows.tolist() == rows_ref.tolist()
    assert r.ids == [f"r{i}" for i in rows_ref.tolist()]
    assert torch.equal(r.scores.isnan(), scores_ref.isnan())
    assert torch.equal(r.scores.nan_to_num(7.0), scores_ref.nan_to_num(7.0))  # bitwise


# ============================================================ 1. a build that drops everything


def test_a_build_whose_every_record_is_dropped_is_an_error(tmp_path, tiny, train_records):
    with pytest.raises(CacheError) as err:  # every reply cut away by max_length, skipped
        build_cache(tiny, train_records, out=tmp_path / "a", layers=[1], max_length=4,
                    on_error="skip", progress=False)  # fmt: skip
    one_line(err.value, "all 12 examples were skipped", "max_length")
    assert not (tmp_path / "a" / "manifest.json").exists()

    @registry.register_stat("bnd_inf", needs_grad=False)
    def bnd_inf(acts):  # noqa: ANN001, ANN202
        return torch.full((acts.mask.shape[0], acts.z_out.shape[-1]), torch.inf)

    try:  # every row non-finite, skipped
        with pytest.raises(CacheError) as err:
            build_cache(tiny, train_records[:3], out=tmp_path / "b", layers=[1],
                        stats=["bnd_inf"], on_error="skip", progress=False)  # fmt: skip
        one_line(err.value, "all 3 examples were skipped", "non-finite bnd_inf")
    finally:
        registry.STAT.pop("bnd_inf")


def test_the_cli_does_not_report_a_cache_of_0_examples(tmp_path, built, capsys):
    rc = main(["cache", "--model", "tiny-random", "--device", "cpu", "--quiet", "--layers", "1",
               "--stats", "resid_post", "--train", str(built["train"]), "--out",
               str(tmp_path / "c"), "--max-length", "4", "--skip-bad"])  # fmt: skip
    cli_error(capsys, rc, "all 12 examples were skipped")
    assert not (tmp_path / "c" / "manifest.json").exists()


# ================================================================ 2. tie order and chunking


@pytest.mark.parametrize("score", ["cosine", "whitened_cosine", "dot"])
@pytest.mark.parametrize("bottom", [False, True])
def test_per_row_scores_do_not_depend_on_chunking(hcache, hquery, score, bottom):
    ref = lensattr.rank(hcache, hquery, layer=0, score=score, top_k=None, bottom=bottom)
    for block in (1024, 4, 3):
        with mock.patch.object(RANK, "SCORE_BLOCK", block):
            base = lensattr.rank(hcache, hquery, layer=[0, 1], score=score, top_k=None,
                                 bottom=bottom)  # fmt: skip
            for chunk in (1, 2, 3, 5, 7, 1000):
                r = lensattr.rank(hcache, hquery, layer=[0, 1], score=score, top_k=None,
                                  bottom=bottom, chunk_rows=chunk)  # fmt: skip
                assert r.rows.tolist() == base.rows.tolist()
                assert torch.equal(r.scores, base.scores)  # bitwise
                sub = lensattr.rank(hcache, hquery, layer=[0, 1], score=score, top_k=None,
                                    bottom=bottom, chunk_rows=chunk, rows=[17, 5, 9])  # fmt: skip
                assert torch.equal(sub.scores, base.scores_of(sub.rows))  # whatever else is kept
    one = lensattr.rank(hcache, hquery, layer=0, score=score, top_k=None, bottom=bottom,
                        chunk_rows=1)  # fmt: skip
    assert one.rows.tolist() == ref.rows.tolist() and torch.equal(one.scores, ref.scores)


# ============================================================ 3., 4. chunk_rows, top_k and rows


@pytest.mark.parametrize("value", [-5, 0, 2.5, True, "3"])
def test_chunk_rows_must_be_a_positive_integer(hcache, hquery, value):
    with pytest.raises(ValueError) as err:
        unchecked(lensattr.rank)(hcache, hquery, layer=0, chunk_rows=value)
    one_line(err.value, "chunk_rows must be a positive integer")


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ([0.5], "0.5 is not an integer"),
        ([-1], "-1 is negative"),
        ([99], "99 is out of range for 23 rows"),
        ([True, False], "a boolean mask of length 2, for 23 rows"),
        (torch.ones(3, dtype=torch.bool), "a boolean mask of length 3, for 23 rows"),
        ([True, 3], "a boolean among integers"),
        (torch.tensor([0.0, 1.0]), "float32 values are not row indices"),
        ("0,1", "is not a list of row indices or a boolean mask"),
        (3, "is not a list of row indices or a boolean mask"),
        ([], "nothing to rank"),
        ([False] * N, "nothing to rank"),
    ],
)
def test_rows_are_indices_or_a_mask_else_refused(hcache, hquery, rows, problem):
    with pytest.raises(ValueError) as err:
        lensattr.rank(hcache, hquery, layer=0, rows=rows)
    one_line(err.value, problem)


def test_a_mask_is_a_mask(hcache, hquery):
    mask = [i % 3 == 0 for i in range(N)]
    want = lensattr.rank(hcache, hquery, layer=0, rows=[i for i in range(N) if i % 3 == 0])
    for as_given in (mask, torch.tensor(mask), np.array(mask)):
        r = lensattr.rank(hcache, hquery, layer=0, rows=as_given)
        assert r.rows.tolist() == want.rows.tolist() and sorted(r.rows.tolist()) == list(
            range(0, N, 3)
        )
    assert lensattr.rank(hcache, hquery, layer=0, rows=[3, 3, 0]).rows.tolist() in ([0, 3], [3, 0])


def test_select_refuses_rows_out_of_range(tiny, built, pair_records):
    with pytest.raises(ValueError) as err:
        lensattr.select(tiny, built["cache"], pair_records, rows=[99])
    one_line(err.value, "rows: 99 is out of range for 12 rows")


# =================================================== 5. registered functions' output shapes


@pytest.mark.parametrize("name", sorted(BAD_SHAPES))
def test_a_score_of_the_wrong_shape_is_refused_naming_it(hcache, hquery, name):
    with pytest.raises(MethodError) as err:
        lensattr.rank(hcache, hquery, layer=0, score=name)
    one_line(err.value, f"score {name!r}", "test_boundary.<lambda>", "one score per row")


def test_a_query_rule_or_statistic_of_the_wrong_shape_is_refused_naming_it(
    tmp_path, tiny, train_records, pair_records
):
    @registry.register_query("bnd_flat", stat="resid_post")
    def bnd_flat(treatment, control, pool):  # noqa: ANN001, ANN202
        return (treatment - control).mean(0)  # [d], not one contribution per pair

    @registry.register_stat("bnd_one_row", needs_grad=False)
    def bnd_one_row(acts):  # noqa: ANN001, ANN202
        return pool(acts.z_out, acts.mask)[:1]  # would broadcast to every row

    try:
        ps = pair_stats(tiny, pair_records, stats=["resid_post"], layers=[1])
        with pytest.raises(MethodError) as err:
            behavior_query(tiny, ps, query="bnd_flat")
        one_line(err.value, "query 'bnd_flat'", "bnd_flat", "(6, 32)", "one contribution per pair")
        with pytest.raises(MethodError) as err:
            build_cache(tiny, train_records[:4], out=tmp_path / "c", layers=[1],
                        stats=["bnd_one_row"], progress=False)  # fmt: skip
        one_line(err.value, "statistic 'bnd_one_row'", "shape (1, 32)", "one row per example")
        with pytest.raises(MethodError):
            pair_stats(tiny, pair_records, stats=["bnd_one_row"], layers=[1])
    finally:
        registry.QUERY.pop("bnd_flat")
        registry.STAT.pop("bnd_one_row")


# ======================================================================== 6. plugins


def test_a_plugin_replaces_a_builtin_only_when_the_user_allows_it(tmp_path, monkeypatch, caplog):
    install_plugin(
        tmp_path,
        monkeypatch,
        "bndplugin",
        """
        from lensattr import register_score

        @register_score("cosine", batched=True, override=True)
        def cosine(rows, norms, query, ctx=None):
            return rows @ query
        """,
    )
    builtin = registry.SCORE["cosine"]
    monkeypatch.delenv(registry.OVERRIDES_ENV, raising=False)
    try:
        with caplog.at_level("WARNING", logger="lensattr.registry"):
            assert registry.get_score("cosine") is builtin
        assert "bndplugin" in caplog.text and "LENSATTR_PLUGIN_OVERRIDES=cosine" in caplog.text
        sys.modules.pop("bndplugin")  # a fresh interpreter, now with the user's consent
        monkeypatch.setattr(registry, "_loaded", False)
        monkeypatch.setenv(registry.OVERRIDES_ENV, "dot,cosine")
        caplog.clear()
        with caplog.at_level("WARNING", logger="lensattr.registry"):
            assert registry.get_score("cosine").module == "bndplugin"
        assert "replaces the built-in score 'cosine'" in caplog.text
    finally:
        registry.SCORE["cosine"] = builtin
        sys.modules.pop("bndplugin", None)


# ===================================================================== 7. pairs that are equal


def test_pairs_whose_two_sides_are_the_same_are_refused_naming_them(tiny, pair_records):
    same = [dict(r) for r in pair_records]
    same[2]["control"] = same[2]["treatment"]
    with pytest.raises(QueryError) as err:
        behavior_query(tiny, same, layers=[1])
    one_line(err.value, "pairs 'p2' have the same treatment and control", "1 of 6 pairs")
    long = [
        {"id": f"q{i}", "prompt": "Tell me.", "treatment": "Same start " * 8 + "yes",
         "control": "Same start " * 8 + "no"}
        for i in range(4)
    ]  # fmt: skip
    with pytest.raises(QueryError) as err:  # the difference lies beyond max_length
        behavior_query(tiny, long, layers=[1], max_length=100)
    one_line(err.value, "differ only beyond max_length=100", "raise max_length", "4 of 4 pairs")
    assert behavior_query(tiny, long, layers=[1], max_length=512).n_pairs == 4


# ================================================== 9. names: plain, and never part of a path


@pytest.mark.parametrize("name", [None, 5, "", "a/b", "..", ".hidden", "x/../../escaped", "a|b"])
@pytest.mark.parametrize("kind", ["statistic", "query", "score"])
def test_registry_names_are_plain_names(kind, name):
    deco = {
        "statistic": lambda: unchecked(registry.register_stat)(name),
        "query": lambda: unchecked(registry.register_query)(name, stat="resid_post"),
        "score": lambda: unchecked(registry.register_score)(name),
    }[kind]
    with pytest.raises(ValueError) as err:
        deco()(lambda *a: None)
    one_line(err.value, f"{kind} name {name!r} is not a plain name")
    assert name not in registry.STAT and name not in registry.QUERY and name not in registry.SCORE
    with pytest.raises(ValueError, match="statistic name 'a/b' is not a plain name"):
        registry.register_query("bnd_ok", stat="a/b")(lambda *a: None)
    assert "bnd_ok" not in registry.QUERY


def test_a_crafted_statistic_name_never_reaches_a_path(tmp_path, hcache, monkeypatch):
    import shutil

    import lensattr.moments

    out = tmp_path / "deep" / "c"
    shutil.copytree(hcache.path, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["stats"] = ["x/../../escaped"]
    write_manifest(out, manifest)  # a forger recomputes the checksum
    with pytest.raises(CacheError) as err:
        open_cache(out)
    one_line(err.value, "statistic name 'x/../../escaped' is not a plain name")
    monkeypatch.setattr(lensattr.moments, "PERSIST_ROWS", 1)  # moments written to disk
    monkeypatch.setattr(lensattr.moments, "_MEMO", {})
    with pytest.raises(ValueError, match="not a plain file name"):
        pool_moments(hcache, "x/../../escaped", 0)
    assert not list(tmp_path.rglob("*escaped*"))
    assert not list(hcache.path.parent.glob("*escaped*"))
    pool_moments(hcache, "hand", 0)  # a plain one persists, inside the cache
    assert (hcache.path / "moments-hand-0.safetensors").exists()


# ===================================================== 10. another statistic than the query's


def test_rank_refuses_a_statistic_the_query_was_not_built_on(built):
    with pytest.raises(QueryError) as err:
        lensattr.rank(built["cache"], built["query"], layer=3, stat="grad")
    one_line(err.value, "stat='grad'", "built on 'residual_change'")
    r = lensattr.rank(built["cache"], built["query"], layer=3, stat="residual_change")
    assert r.stat == "residual_change"


# ======================================================================= 11. select's sizes


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"pool_sample": 0}, "pool_sample must be a positive integer or None, not 0"),
        ({"pool_sample": -3}, "pool_sample must be a positive integer or None, not -3"),
        ({"folds": 0}, "folds must be an integer >= 2, not 0"),
        ({"folds": -1}, "folds must be an integer >= 2, not -1"),
        ({"folds": 1}, "folds must be an integer >= 2, not 1"),
        ({"set_size": 0}, "set_size must be a positive integer, not 0"),
        ({"folds": 2.5}, "folds must be an integer >= 2, not 2.5"),
    ],
)
def test_select_sizes_are_checked_before_any_work(hcache, kwargs, problem):
    with pytest.raises(ValueError) as err:  # no model: nothing may run before the check
        unchecked(lensattr.select)(None, hcache, "no-such-pairs.jsonl", **kwargs)
    one_line(err.value, problem)


# ============================================================================ 12. JSON ids


@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_id_is_refused(tmp_path, value):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"id": value, "prompt": "Hi", "response": "Yo"}) + "\n")
    with pytest.raises(DataError) as err:
        lensattr.load_examples(path)
    one_line(err.value, f"{path}:1, field 'id': expected a string, got bool")
    with pytest.raises(DataError, match="got bool"):
        lensattr.load_pairs([{"id": value, "prompt": "Q", "treatment": "a", "control": "b"}])


# ======================================================== 13. which function computed a statistic


def test_a_query_from_another_statistic_function_is_refused(
    tmp_path, tiny, train_records, pair_records
):
    builtin = registry.STAT["resid_post"]
    assert lensattr.build_cache(tiny, train_records[:4], out=tmp_path / "b", layers=[1],
                                stats=["resid_post"], progress=False).manifest["stat_modules"] == {
        "resid_post": "lensattr.methods.statistics"
    }  # fmt: skip
    try:  # an overridden built-in: the same name, another function
        registry.register_stat("resid_post", needs_grad=False, override=True)(
            lambda acts: 2 * pool(acts.z_out, acts.mask)
        )
        cache = build_cache(tiny, train_records[:4], out=tmp_path / "c", layers=[1],
                            stats=["resid_post"], progress=False)  # fmt: skip
        with pytest.raises(CacheError) as err:  # nor are its rows reused for the built-in
            build_cache(tiny, train_records[:4], out=tmp_path / "d", layers=[1],
                        stats=["resid_post"], reuse=open_cache(tmp_path / "b"),
                        progress=False)  # fmt: skip
        one_line(err.value, "cannot be reused", "computed by lensattr.methods.statistics")
    finally:
        registry.STAT["resid_post"] = builtin
    assert cache.manifest["stat_modules"] == {"resid_post": "test_boundary"}
    assert cache.manifest["lensattr_version"] == lensattr.__version__
    q = behavior_query(tiny, pair_records, query="residual_diff", layers=[1])
    assert q.stat_module == "lensattr.methods.statistics"
    with pytest.raises(CacheError) as err:
        lensattr.rank(cache, q, layer=1)
    one_line(err.value, "'resid_post' rows were computed by test_boundary",
             "by lensattr.methods.statistics")  # fmt: skip
    with pytest.raises(CacheError, match="computed by test_boundary"):
        behavior_query(tiny, pair_records, query="pool_contrast", layers=[1], pool=cache)
    q.save(tmp_path / "q.safetensors")  # recorded in a saved query too
    assert Query.load(tmp_path / "q.safetensors").stat_module == "lensattr.methods.statistics"


# ================================================================ 14. JSON has no NaN


def test_rank_writes_null_for_a_non_finite_score(built, tmp_path, capsys):
    @registry.register_score("bnd_nan")
    def bnd_nan(rows, norms, query, ctx=None):  # noqa: ANN001, ANN202
        return torch.where(norms == norms.max(), torch.nan, rows @ query)

    try:
        out = tmp_path / "r.jsonl"
        rc = main(["rank", "--cache", str(built["cache"].path), "--query",
                   str(built["root"] / "q.safetensors"), "--layer", "3", "--score", "bnd_nan",
                   "--top-k", "20", "--out", str(out)])  # fmt: skip
    finally:
        registry.SCORE.pop("bnd_nan")
    assert rc == 0, capsys.readouterr().err

    def refuse(word: str):  # noqa: ANN202
        raise ValueError(f"not JSON: {word}")

    rows = [json.loads(line, parse_constant=refuse) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and rows[-1]["score"] is None
    assert all(isinstance(r["score"], float) for r in rows[:-1])


# ============================================================== 15. lock symlink, file modes


def test_a_lock_planted_as_a_symlink_is_not_followed(tmp_path, tiny, train_records):
    out = tmp_path / "c"
    out.mkdir()
    (out / ".lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CacheError) as err:
        build_cache(tiny, train_records[:2], out=out, layers=[1], progress=False)
    one_line(err.value, ".lock is a symbolic link")
    assert not (tmp_path / "elsewhere").exists()


def test_saved_queries_and_pair_statistics_respect_the_umask(tmp_path, tiny, pair_records):
    ps = pair_stats(tiny, pair_records, stats=["resid_post"], layers=[1])
    q = behavior_query(tiny, ps, query="residual_diff")
    old = os.umask(0o002)
    try:
        q.save(tmp_path / "q.safetensors")
        ps.save(tmp_path / "ps.safetensors")
    finally:
        os.umask(old)
    for name in ("q.safetensors", "ps.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o664, name
    back = PairStats.load(tmp_path / "ps.safetensors")
    assert back.sources == {"resid_post": "lensattr.methods.statistics"}
    assert torch.equal(back.sides("resid_post", 1)[0], ps.sides("resid_post", 1)[0])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


# ======================================================== 16. outputs that would overwrite inputs


def test_rank_and_query_refuse_outputs_inside_the_cache_or_equal_to_an_input(built, capsys):
    cache, root = built["cache"].path, built["root"]
    before = (cache / "manifest.json").read_bytes()
    query = str(root / "q.safetensors")
    for out in (cache / "manifest.json", cache / "new.jsonl"):
        rc = main(["rank", "--cache", str(cache), "--query", query, "--out", str(out)])
        cli_error(capsys, rc, f"--out {out}", "cache")
    rc = main(["rank", "--cache", str(cache), "--query", query, "--out", query])
    cli_error(capsys, rc, "that is an input of this command")
    rc = main(["query", "--model", "tiny-random", "--device", "cpu", "--pairs",
               str(built["pairs"]), "--cache", str(cache), "--out",
               str(cache / "q.safetensors")])  # fmt: skip
    cli_error(capsys, rc, "inside the cache directory")
    assert (cache / "manifest.json").read_bytes() == before
    assert not (cache / "new.jsonl").exists() and not (cache / "q.safetensors").exists()
    open_cache(cache, verify="full")


# ================================================= tracebacks and wrong messages: one line each


def test_an_empty_or_unreadable_parquet_file_is_one_line(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as err:
        lensattr.load_examples(empty)
    one_line(err.value, f"{empty}: not a readable parquet file")
    rc = main(["cache", "--model", "tiny-random", "--device", "cpu", "--quiet", "--layers", "1",
               "--train", str(empty), "--out", str(tmp_path / "c")])  # fmt: skip
    cli_error(capsys, rc, f"{empty}: not a readable parquet file")
    no_rows = tmp_path / "none.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()),
                             "response": pa.array([], pa.string())}), no_rows)  # fmt: skip
    assert lensattr.load_examples(no_rows) == []
    with pytest.raises(DataError, match="no examples"):
        build_cache("tiny-random", no_rows, out=tmp_path / "c2", progress=False)
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["Hi"], "response": ["Yo"]}), good)
    assert [e.id for e in lensattr.load_examples(good)] == ["a"]


def test_a_shard_that_cannot_be_written_is_named(tmp_path, built, capsys):
    """``ulimit -f``: the write fails with EFBIG (Python ignores SIGXFSZ)."""
    out = tmp_path / "c"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))
    try:
        rc = main(["cache", "--model", "tiny-random", "--device", "cpu", "--quiet", "--layers",
                   "0:4", "--train", str(built["train"]), "--out", str(out)])  # fmt: skip
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    cli_error(capsys, rc, f"{out}/shard-00000.safetensors: could not write it (File too large)")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_corrupt_build_record_is_named(tmp_path, tiny, train_records):
    out = tmp_path / "c"
    out.mkdir()
    (out / "build.json").write_text("{")
    with pytest.raises(CacheError) as err:
        build_cache(tiny, train_records[:2], out=out, layers=[1], progress=False)
    one_line(err.value, f"{out / 'build.json'}: corrupt build record", "delete it")


def test_a_query_of_another_dimension_is_refused(hcache):
    q = Query(
        vectors={0: unit(torch.ones(8))}, rule="contrast", stat="hand", model=MODEL, n_pairs=2
    )
    with pytest.raises(CacheError) as err:
        lensattr.rank(hcache, q, layer=0)
    one_line(err.value, "the query's vectors have 8 dimensions, the cache's rows 16")


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("cv", "[1, 2]", "field 'cv'"),
        ("cv", '{"1": "high"}', "field 'cv'"),
        ("model", "[1]", "field 'model'"),
        ("pool", "5", "field 'pool'"),
        ("capture", "[1]", "not a lensattr query"),
        ("n_pairs", "x", "not a lensattr query"),
        ("rule", "a/b", "field 'rule'"),
        ("stat", "", "field 'stat'"),
        ("stat_module", "7", "field 'stat_module'"),
        ("layer", '"best"', "field 'layer'"),
    ],
)
def test_a_query_field_of_the_wrong_kind_is_one_line(built, tmp_path, field, value, problem):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = built["root"] / "q.safetensors"
    with safe_open(str(src), "pt") as fh:
        meta = {**fh.metadata(), field: value}
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(src)), str(bad), meta)
    with pytest.raises(QueryError) as err:
        lensattr.rank(built["cache"], bad, layer=3)
    one_line(err.value, str(bad), problem)


def test_a_query_file_that_is_not_one_is_named(tmp_path, built, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_text("hello")
    with pytest.raises(QueryError) as err:
        Query.load(junk)
    one_line(err.value, f"{junk}: not a lensattr query")
    with pytest.raises(IsADirectoryError):  # its own error, naming the path
        Query.load(tmp_path)
    rc = main(["rank", "--cache", str(built["cache"].path), "--query", str(tmp_path), "--out",
               str(tmp_path / "r.jsonl")])  # fmt: skip
    cli_error(capsys, rc, f"{tmp_path}: is a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_a_query_file_without_read_permission_says_so(tmp_path, built, capsys):
    q = tmp_path / "q.safetensors"
    q.write_bytes((built["root"] / "q.safetensors").read_bytes())
    q.chmod(0)
    rc = main(["rank", "--cache", str(built["cache"].path), "--query", str(q), "--out",
               str(tmp_path / "r.jsonl")])  # fmt: skip
    cli_error(capsys, rc, f"{q}: permission denied")


def test_metrics_refuse_scores_and_labels_of_different_lengths():
    for fn in (lensattr.metrics.auroc, lensattr.metrics.average_precision):
        with pytest.raises(ValueError) as err:
            fn(torch.ones(3), torch.tensor([1, 0]))
        one_line(err.value, "scores has shape (3,) and labels (2,)")
    with pytest.raises(ValueError) as err:
        lensattr.pool_metrics(torch.ones(3), [1, 0])
    one_line(err.value, "pool_metrics: 2 labels for 3 scores")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has a GPU")
def test_cache_on_cuda_without_cuda_is_one_line(tmp_path, built, capsys):
    rc = main(["cache", "--model", "tiny-random", "--device", "cuda", "--quiet", "--train",
               str(built["train"]), "--out", str(tmp_path / "c")])  # fmt: skip
    cli_error(capsys, rc, "--device 'cuda': CUDA is not available", "--device cpu")


def test_query_out_at_a_directory_or_nowhere_is_a_write_error(tmp_path, built, capsys):
    base = ["query", "--model", "tiny-random", "--device", "cpu", "--quiet", "--layers", "1",
            "--pairs", str(built["pairs"]), "--out"]  # fmt: skip
    (tmp_path / "dir").mkdir()
    cli_error(capsys, main([*base, str(tmp_path / "dir")]), f"{tmp_path / 'dir'}: is a directory")
    nowhere = tmp_path / "missing" / "q.safetensors"
    cli_error(capsys, main([*base, str(nowhere)]), f"{nowhere}: no such file or directory")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bench_ft_seeds_must_be_integers(tmp_path, capsys):
    """Parsed by the flag's type (BenchConfig generates the flags): argparse's usage, then one
    error line naming the flag; no traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--out", str(tmp_path), "--data", str(tmp_path), "--ft-seeds", "a,b"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("lensattr bench: error: argument --ft-seeds")


def test_a_model_directory_of_pickled_weights_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError) as err:
        lensattr.load_model(tmp_path)
    one_line(err.value, "holds pickled weights (pytorch_model.bin)", "safetensors only")
    rc = main(["cache", "--model", str(tmp_path), "--device", "cpu", "--quiet", "--train",
               str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "c")])  # fmt: skip
    cli_error(capsys, rc, "holds pickled weights")


# ===================================================================== hypothesis: the boundary

ROWS = st.one_of(
    st.none(),
    st.lists(st.integers(-3, N + 3), max_size=8),
    st.lists(st.booleans(), min_size=N, max_size=N),
    st.lists(st.booleans(), min_size=N - 1, max_size=N + 1),
    st.lists(st.integers(0, N - 1), min_size=1, max_size=8).map(torch.tensor),
    st.lists(st.booleans(), min_size=N, max_size=N).map(lambda m: torch.tensor(m)),
    st.lists(st.floats(-1, N, allow_nan=False), min_size=1, max_size=3),
)
SIZES = st.one_of(st.none(), st.integers(-3, N + 3), st.floats(0.5, 4.5), st.booleans())


def _expected_rows(rows):  # noqa: ANN001, ANN202
    """The rows ``rows`` names, ``None`` for all, or ``"error"`` when it must be refused."""
    if rows is None:
        return None
    items = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
    if items and all(isinstance(x, bool) for x in items):
        if len(items) != N:
            return "error"
        keep = [i for i, x in enumerate(items) if x]
    elif all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        if any(x < 0 or x >= N for x in items):
            return "error"
        keep = sorted(set(items))
    else:
        return "error"
    return torch.tensor(keep, dtype=torch.long) if keep else "error"


def _size_ok(value) -> bool:  # noqa: ANN001
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    rows=ROWS,
    chunk_rows=SIZES,
    top_k=SIZES,
    bottom=st.booleans(),
    layer=st.sampled_from([0, 1, [0, 1], [1, 0]]),
    score=st.sampled_from(GOOD_SCORES + sorted(BAD_SHAPES)),
    block=st.sampled_from([1024, 1, 2, 3, 5, 8]),
)
def test_rank_is_the_brute_force_ranking_or_a_one_line_error(
    hcache, hquery, rows, chunk_rows, top_k, bottom, layer, score, block
):
    keep = _expected_rows(rows)
    valid = keep != "error" if not isinstance(keep, torch.Tensor) else True
    right_shape = score in GOOD_SCORES or (score == "bnd_one" and block == 1)  # [1] of 1 row
    valid = valid and _size_ok(chunk_rows) and _size_ok(top_k) and right_shape
    with mock.patch.object(RANK, "SCORE_BLOCK", block):
        try:
            r = unchecked(lensattr.rank)(hcache, hquery, layer=layer, score=score, rows=rows,
                              chunk_rows=chunk_rows, top_k=top_k, bottom=bottom)  # fmt: skip
        except ValueError as err:
            assert not valid, err
            text = one_line(err)
            named = ["rows", "chunk_rows", "top_k", "nothing to rank", f"score {score!r}"]
            assert any(word in text for word in named), text
            return
    assert valid, "a bad argument was accepted"
    layers = layer if isinstance(layer, list) else [layer]
    want_rows, want_scores = reference(
        hcache, hquery, layers, score, keep if isinstance(keep, torch.Tensor) else None,
        top_k, bottom, block,
    )  # fmt: skip
    same_ranking(r, want_rows, want_scores)
    assert r.n_nonfinite == int(want_scores.isnan().sum()) or top_k is not None


@pytest.fixture(scope="module")
def hpairs(hrows):
    """Pair statistics of the synthetic cache's statistic: treatments lean along the pool's
    first row, so held-out measures are not all ties."""
    gen = torch.Generator().manual_seed(2)
    t = {la: hrows[la][:6] + torch.randn(6, D, generator=gen) for la in LAYERS}
    c = {la: torch.randn(6, D, generator=gen) for la in LAYERS}
    return PairStats({"hand": t}, {"hand": c}, MODEL)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    rows=ROWS,
    folds=st.one_of(st.integers(-1, 7), st.floats(1.5, 3.5)),
    pool_sample=SIZES,
    set_size=st.integers(-1, 3),
    score=st.sampled_from(["cosine", "bnd_rowcos", "dot", *sorted(BAD_SHAPES)]),
)
def test_select_chooses_or_refuses_in_one_line(
    hcache, hpairs, rows, folds, pool_sample, set_size, score
):
    keep = _expected_rows(rows)
    valid = (keep != "error" if not isinstance(keep, torch.Tensor) else True) and (
        isinstance(folds, int) and folds >= 2 and _size_ok(pool_sample) and set_size >= 1
    )
    valid = valid and score in GOOD_SCORES and (keep is None or len(keep) >= 2)
    try:
        sel = unchecked(lensattr.select)(None, hcache, hpairs, methods=[f"contrast|hand|{score}"],
                              rows=rows, folds=folds, pool_sample=pool_sample,
                              set_size=set_size)  # fmt: skip
    except ValueError as err:
        text = one_line(err)
        assert not valid or "fewer than a held-out fold" in text, text
        return
    assert valid, "a bad argument was accepted"
    assert str(sel.method) == f"contrast|hand|{score}"
    assert all(math.isfinite(r["criterion"]) for r in sel.table)
    if isinstance(keep, torch.Tensor):  # the same pool given as indices or as a mask
        mask = torch.zeros(N, dtype=torch.bool)
        mask[keep] = True
        again = lensattr.select(None, hcache, hpairs, methods=[f"contrast|hand|{score}"],
                                rows=mask, folds=folds, pool_sample=pool_sample,
                                set_size=set_size)  # fmt: skip
        assert again.table == sel.table and again.layer == sel.layer


@settings(max_examples=120, deadline=None)
@given(
    kind=st.sampled_from(["statistic", "query", "score"]),
    shape=st.lists(st.integers(0, 5), max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool]),
    n=st.integers(1, 4),
    q=st.one_of(st.none(), st.integers(1, 3)),
)
def test_registered_outputs_are_right_or_refused_naming_the_function(kind, shape, dtype, n, q):
    from lensattr.types import LayerActs

    d = 3
    out = torch.zeros(shape, dtype=dtype)
    fn = lambda *args: out  # noqa: E731
    fn.__qualname__ = "bnd_fn"
    if kind == "statistic":
        item = registry.Stat("bnd_p", fn, module="tests")
        z = torch.zeros(n, 2, d)
        call, want = (
            (lambda: item.apply(LayerActs(z, z, None, torch.ones(n, 2, dtype=bool)))),
            [
                n,
                d,
            ],
        )
    elif kind == "query":
        item = registry.QueryRule("bnd_p", fn, stat="hand", module="tests")
        call, want = (lambda: item.apply(torch.zeros(n, d), torch.zeros(n, d), None)), [n, d]
    else:
        item = registry.Score("bnd_p", fn, module="tests")
        vec = torch.zeros(d) if q is None else torch.zeros(d, q)
        call, want = (
            (lambda: item.apply(torch.zeros(n, d), torch.zeros(n), vec, None)),
            ([n] if q is None else [n, q]),
        )
    ok = shape == want and dtype.is_floating_point
    try:
        got = call()
    except MethodError as err:
        assert not ok
        one_line(err, f"{kind} 'bnd_p' (tests.bnd_fn)", f"shape {tuple(want)}")
        return
    assert ok and got is out
