"""auto's ensemble: members' standardised scores averaged, checked against a direct computation."""

import pytest
import torch

import lensattr
from lensattr import Ensemble, behavior_query, build_cache, rank, select
from lensattr.criterion import best_rows, method_scores
from lensattr.query import QueryError


@pytest.fixture(scope="module")
def setup(tiny, train_records, pair_records, tmp_path_factory):
    out = tmp_path_factory.mktemp("ens")
    cache = build_cache(
        tiny,
        train_records,
        out=out / "c",
        layers=[1, 3],
        stats=["resid_post", "grad"],
        storage_dtype="float32",
        progress=False,
    )
    ps = lensattr.pair_stats(tiny, pair_records, stats=["resid_post", "grad"], layers=[1, 3])
    return cache, ps


def _member(ps, rule, stat, score, layer, pool=None):
    q = behavior_query(None, ps, query=rule, stat=stat, score=score, layers=[1, 3], pool=pool)
    q.layer = layer
    return q


def test_an_ensemble_ranks_by_the_mean_standardised_score(setup):
    cache, ps = setup
    a = _member(ps, "contrast", "resid_post", "cosine", 3)
    b = _member(ps, "contrast", "grad", "dot", 1)
    r = rank(cache, Ensemble([a, b]), top_k=None)
    # directly: cosine and dot products of the cached rows, each standardised, then averaged
    x3 = cache.stat("resid_post", 3)[:].double()
    x1 = cache.stat("grad", 1)[:].double()
    sa = (x3 @ a.vector(3).double()) / x3.norm(dim=1)
    sb = x1 @ b.vector(1).double()
    za, zb = ((s - s.mean()) / s.std() for s in (sa, sb))
    want = (za + zb) / 2
    order = torch.argsort(-want, stable=True)
    assert r.rows.tolist() == order.tolist()
    assert torch.allclose(r.scores.double(), want[order], atol=1e-5)
    assert (r.stat, r.score, r.layer) == ("grad+resid_post", "mean_zscore", (1, 3))
    top = rank(cache, Ensemble([a, b]), top_k=3)
    assert top.ids == r.ids[:3]
    bottom = rank(cache, Ensemble([a, b]), top_k=2, bottom=True)
    assert bottom.rows.tolist() == torch.argsort(want, stable=True)[:2].tolist()
    some = rank(cache, Ensemble([a, b]), top_k=None, rows=[0, 2, 5, 7])
    assert sorted(some.rows.tolist()) == [0, 2, 5, 7]


def test_an_ensemble_is_saved_and_loaded_whole(setup, tmp_path):
    cache, ps = setup
    ens = Ensemble([_member(ps, "contrast", "resid_post", "cosine", 3),
                    _member(ps, "pool_contrast", "grad", "centered_cosine", 1, cache)])  # fmt: skip
    ens.save(tmp_path / "e.safetensors")
    back = Ensemble.load(tmp_path / "e.safetensors")
    for m, n in zip(ens.members, back.members, strict=True):
        assert (m.rule, m.stat, m.score, m.layer) == (n.rule, n.stat, n.score, n.layer)
        assert all(torch.equal(m.vector(la), n.vector(la)) for la in m.layers)
    via_path = rank(cache, tmp_path / "e.safetensors", top_k=None)
    assert torch.equal(via_path.scores, rank(cache, ens, top_k=None).scores)
    (tmp_path / "q.safetensors").write_bytes(b"not a file")
    with pytest.raises(QueryError, match="q.safetensors"):
        rank(cache, tmp_path / "q.safetensors")


def test_an_ensemble_refuses_a_layer_and_a_member_without_one(setup):
    cache, ps = setup
    ens = Ensemble([_member(ps, "contrast", "resid_post", "cosine", 3)])
    with pytest.raises(ValueError, match="its own layer"):
        rank(cache, ens, layer=1)
    with pytest.raises(QueryError, match="has no layer"):
        Ensemble([behavior_query(None, ps, query="contrast", stat="grad", layers=[1])])
    with pytest.raises(QueryError, match="at least one"):
        Ensemble([])


def test_select_ranks_with_its_top_methods_together(setup):
    cache, ps = setup
    sel = select(None, cache, ps, ensemble=4)
    assert sel.ensemble is not None and len(sel.ensemble.members) == 4
    means, best = method_scores(sel.table), best_rows(sel.table)
    top = sorted(means, key=lambda m: means[m], reverse=True)[:4]
    got = [f"{q.rule}|{q.stat}|{q.score}" for q in sel.ensemble.members]
    assert got == top
    assert [q.layer for q in sel.ensemble.members] == [best[m]["layer"] for m in top]
    assert torch.equal(rank(cache, sel, top_k=None).scores,
                       rank(cache, sel.ensemble, top_k=None).scores)  # fmt: skip
    assert set(sel.layers) == {la for q in sel.ensemble.members for la in [q.layer]}
    one = select(None, cache, ps, ensemble=1)
    assert one.ensemble is None and rank(cache, one, top_k=None).score == one.method.score
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="ensemble must be"):
            select(None, cache, ps, ensemble=bad)
