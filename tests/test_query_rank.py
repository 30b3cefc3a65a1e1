"""Queries, ranking and explanations against direct computations."""

import html

import pytest
import torch
from reference import reference_capture, reference_stats

from lensattr import (
    CacheError,
    behavior_query,
    build_cache,
    explain,
    load_examples,
    load_model,
    load_pairs,
    rank,
)
from lensattr.query import Query, QueryError
from lensattr.rank import Ranking
from lensattr.registry import get_stat
from lensattr.render import collate, encode


def stat_of(model, examples, stat, layer):
    encs = [encode(model.tokenizer, ex, 512) for ex in examples]
    b = collate(encs, model.pad_id)
    ref = reference_capture(
        model.hf, b.input_ids, b.attention_mask, b.position_ids, b.mask, [layer]
    )
    return reference_stats(*ref[layer], b.mask)[stat]


@pytest.mark.parametrize(
    ("rule", "stat"),
    [
        ("residual_change", "residual_change"),
        ("residual_diff", "resid_post"),
        ("contrast", "residual_change_diagonal"),
        ("contrast", "grad"),
    ],
)
def test_contrast_query_equals_direct_computation(tiny, pair_records, rule, stat):
    kwargs = {"stat": stat} if rule == "contrast" else {}
    q = behavior_query(tiny, pair_records, query=rule, layers=[1, 3], batch_size=4, **kwargs)
    assert q.stat == stat and q.n_pairs == len(pair_records)
    pairs = load_pairs(pair_records)
    for layer in (1, 3):
        t = stat_of(tiny, [p.sides()[0] for p in pairs], stat, layer)
        c = stat_of(tiny, [p.sides()[1] for p in pairs], stat, layer)
        diff = t - c
        if rule == "residual_change":  # the authors' query: each pair normalised first
            diff = diff / diff.norm(dim=1, keepdim=True)
        want = diff.mean(0) / diff.mean(0).norm()
        assert torch.allclose(q.vector(layer), want, atol=1e-5)
        assert 0.0 <= q.cv[layer] <= 1.0


def test_query_save_load_round_trip(tiny, pair_records, tmp_path):
    q = behavior_query(tiny, pair_records, layers=[0, 2])
    q.save(tmp_path / "q.safetensors")
    back = Query.load(tmp_path / "q.safetensors")
    assert back.layers == [0, 2] and back.rule == q.rule and back.model == q.model
    assert back.cv == q.cv
    assert torch.equal(back.vector(2), q.vector(2))


@pytest.fixture(scope="module")
def built(tiny, train_records, pair_records, tmp_path_factory):
    cache = build_cache(
        tiny,
        train_records,
        out=tmp_path_factory.mktemp("c"),
        layers=[1, 2],
        shard_size=5,
        progress=False,
    )
    q = behavior_query(tiny, pair_records, layers=[1, 2])
    return cache, q


@pytest.mark.parametrize("g", ["cosine", "dot"])
def test_rank_streams_to_the_same_order_as_a_full_sort(built, g):
    cache, q = built
    rows = cache.stat("residual_change", 2)[:].float()
    vec = q.vector(2)
    direct = {
        "dot": rows @ vec,
        "cosine": torch.nn.functional.cosine_similarity(rows, vec[None], dim=1),
    }[g]
    r = rank(cache, q, layer=2, score=g, top_k=5, chunk_rows=3)
    assert r.ids == [cache.ids[i] for i in torch.topk(direct, 5).indices.tolist()]
    assert torch.allclose(r.scores, torch.topk(direct, 5).values, atol=1e-5)
    low = rank(cache, q, layer=2, score=g, top_k=4, bottom=True, chunk_rows=5)
    assert torch.allclose(low.scores, torch.topk(-direct, 4).values.neg(), atol=1e-5)
    assert len(rank(cache, q, layer=2, score=g, top_k=None)) == len(cache)


@pytest.mark.parametrize("g", ["cosine", "centered_cosine"])
def test_rank_over_several_layers_is_the_mean_of_their_scores(built, g):
    """``layer=[1, 2]``: each row's score is the mean of its scores at layers 1 and 2, each
    with that layer's query, computed directly; streamed in blocks, on a subset of rows."""
    cache, q = built
    cos = torch.nn.functional.cosine_similarity

    def direct(layer):
        x, vec = cache.stat("residual_change", layer)[:].double(), q.vector(layer).double()
        if g == "centered_cosine":
            mu = x.mean(0)
            return cos(x - mu, vec[None], dim=1)
        return cos(x, vec[None], dim=1)

    mean = (direct(1) + direct(2)) / 2
    r = rank(cache, q, layer=[1, 2], score=g, top_k=None, chunk_rows=3)
    assert r.layer == (1, 2)
    assert torch.allclose(r.scores_of(range(len(cache))).double(), mean, atol=1e-5)
    assert r.ids == [cache.ids[i] for i in torch.sort(-mean, stable=True).indices.tolist()]
    rows = [0, 3, 4, 7]
    sub = rank(cache, q, layer=("blocks.2.hook_resid_post", 1), score=g, rows=rows, top_k=2)
    want = torch.topk(mean[rows], 2).indices.tolist()
    assert sub.ids == [cache.ids[rows[i]] for i in want] and sub.layer == (2, 1)
    one = rank(cache, q, layer=[2], score=g, top_k=None)  # a one-layer list is that layer
    assert one.layer == 2 and torch.equal(
        one.scores, rank(cache, q, layer=2, score=g, top_k=None).scores
    )
    with pytest.raises(ValueError, match="layer 2 twice"):
        rank(cache, q, layer=[2, -2])  # -2 is layer 2 again (of a 4-block model)
    with pytest.raises(ValueError, match="selects no block"):
        rank(cache, q, layer=[])


def test_rank_layers_count_from_the_models_last_block(built):
    """Issue 26 item 8: on the 4-block model, -1 is block 3 (which the query lacks), -2 block 2;
    a range and hook names name the same layers as in ``build_cache(layers=)``."""
    cache, q = built
    assert cache.n_layers == 4 and q.layers == [1, 2]
    ref = rank(cache, q, layer=2, top_k=None)
    for same in (-2, "-2", "blocks.2.hook_resid_post", "blocks.3.hook_resid_pre"):
        r = rank(cache, q, layer=same, top_k=None)
        assert r.layer == 2 and torch.equal(r.scores, ref.scores) and r.ids == ref.ids
    both = rank(cache, q, layer=[1, 2], top_k=None)
    for same in ("1:3", "1,2", "-3:-1", slice(1, 3)):
        assert torch.equal(rank(cache, q, layer=same, top_k=None).scores, both.scores)
    with pytest.raises(
        QueryError,
        match=r"layer 3 of this 4-block model, which the query lacks "
        r"\(it has layers 1,2\)",
    ):
        rank(cache, q, layer=-1)
    with pytest.raises(ValueError, match="out of range for a model with 4 blocks"):
        rank(cache, q, layer=4)
    with pytest.raises(ValueError, match="unknown hook name hook_banana"):
        rank(cache, q, layer="blocks.2.hook_banana")


def test_rank_refuses_a_query_from_another_model(built, pair_records):
    cache, _ = built
    other = load_model(
        __import__("lensattr.testing", fromlist=["x"]).tiny_hf_model(seed=1),
        __import__("lensattr.testing", fromlist=["x"]).tiny_tokenizer(),
    )
    q = behavior_query(other, pair_records, layers=[2])
    with pytest.raises(CacheError, match="weights_sha256"):
        rank(cache, q, layer=2)


def test_explain_contributions_average_to_the_score(tiny, built, train_records):
    _, q = built
    ex = load_examples(train_records)[4]
    e = explain(tiny, ex, q, 2)
    spec = get_stat("residual_change")
    full = stat_of(tiny, [ex], "residual_change", 2)[0]
    assert len(e.tokens) == encode(tiny.tokenizer, ex).n_response
    assert abs(e.total - float(full @ q.vector(2))) < 1e-5 * max(1.0, float(full.norm()))
    assert spec.name == q.stat
    # at a layer set, as rank scores it: each token's mean over the layers, so the total is the
    # mean of the layers' <s(x), q>
    both = explain(tiny, ex, q, [2, 1])
    one = explain(tiny, ex, q, 1)
    assert torch.allclose(both.contributions, (e.contributions + one.contributions) / 2, atol=1e-6)
    at_1 = float(stat_of(tiny, [ex], "residual_change", 1)[0] @ q.vector(1))
    assert both.total == pytest.approx((float(full @ q.vector(2)) + at_1) / 2, abs=1e-5)


def test_short_reprs_and_a_ranking_as_a_table(tiny, built, pair_records):
    """Issue 27 items 8 and 11: one-line reprs (no manifest, no tensors); a ranking as a
    DataFrame that joins back to the data by id, and in data order by row; as HTML."""
    from lensattr import pair_stats

    cache, q = built
    text = repr(cache)
    assert text.startswith(f"Cache({len(cache)} rows, layers 1,2 of 4, stats residual_change")
    assert "sha256" not in text and len(text) < 300
    assert repr(q).startswith(f"Query(residual_change|residual_change|cosine from {q.n_pairs} ")
    assert "tensor" not in repr(q) and len(repr(q)) < 300
    ps = pair_stats(tiny, pair_records[:3], stats=["grad"], layers="0:4")
    assert repr(ps) == "PairStats(3 pairs, stats grad, layers 0:4, model tiny-random)"
    r = rank(cache, q, layer=2, top_k=None)
    assert repr(r).startswith(f"Ranking({len(cache)} of {len(cache)} examples ranked by ")
    df = r.to_pandas()
    assert list(df.index) == list(range(1, len(cache) + 1))
    assert list(df["id"]) == r.ids and list(df["score"]) == r.scores.tolist()
    examples = {ex.id: ex for ex in cache.examples()}
    assert list(df["text"]) == [examples[i].response for i in r.ids]
    in_order = df.sort_values("row")
    assert list(in_order["id"]) == cache.ids
    assert torch.equal(torch.tensor(in_order["score"].tolist()), r.scores_of(range(len(cache))))
    page = r._repr_html_()
    assert page.count("<tr>") == 1 + len(cache) and f"<td>{r.ids[0]}</td>" in page
    assert f"<td>{html.escape(examples[r.ids[0]].response)}</td>" in page
    many = Ranking([f"<x{i}>" for i in range(25)], torch.zeros(25), torch.arange(25), 2, "s", "c")
    page = many._repr_html_()
    assert page.count("<tr>") == 21 and "the first 20 of 25" in page and "&lt;x0&gt;" in page
