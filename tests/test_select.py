"""Pool-aware methods, the no-peek choice (auto) and pool precision, checked directly."""

import itertools
import math

import pytest
import torch

import lensattr
from lensattr import registry
from lensattr.metrics import (
    average_precision,
    pool_metrics,
    pool_metrics_difference,
    precision_at_k,
)
from lensattr.moments import Moments, ScoreContext, pool_moments
from lensattr.query import Query, QueryError, heldout_accuracy, pair_stats
from lensattr.select import Method, candidates, evaluate, select

# ------------------------------------------------------------------------------------ metrics


def brute_ap(scores, labels):
    """AP by its definition, from a Python sort (ties by row index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    hits, total = 0, 0.0
    for r, i in enumerate(order, 1):
        if labels[i]:
            hits += 1
            total += hits / r
    return total / hits


def test_average_precision_and_precision_at_k_match_their_definitions():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.randint(0, 6, (30,), generator=gen).float()  # many ties
        y = torch.rand(30, generator=gen) < 0.3
        y[0] = True
        assert average_precision(s, y) == pytest.approx(brute_ap(s, y))
        order = sorted(range(30), key=lambda i: (-float(s[i]), i))
        assert precision_at_k(s, y, 7) == pytest.approx(sum(bool(y[i]) for i in order[:7]) / 7)


def test_pool_metrics_headline_and_secondary_columns():
    s = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, float("nan")])
    lab = torch.tensor([-1, 1, 0, -1, 1, -1, 1])
    m = pool_metrics(s, lab, n_boot=50, coding="planted")
    assert m["k"] == 3
    assert m["p_at_k"] == pytest.approx(1 / 3)  # top-3: clean, plant, decoy
    assert m["ap"] == pytest.approx((1 / 2 + 2 / 5 + 3 / 7) / 3)  # NaN ranks last
    # plant ranks 1, 4, 6 -> upper median rank 4; clean rows above it: ranks 0 and 3
    assert m["clean_above_median"] == 2
    assert 0 <= m["p_at_k_ci"][0] <= m["p_at_k"] <= m["p_at_k_ci"][1] <= 1
    with pytest.raises(ValueError, match="label-1"):
        pool_metrics(s, torch.full((7,), -1), coding="planted")


def test_pool_metrics_reads_plain_relevant_labels_from_lists_and_arrays():
    """Issue 27 item 2: 0/1 labels mean relevant / not (not "decoy"); lists, arrays and bools
    give the same numbers, checked against a brute-force count; the planted coding is asked
    for by name, and labels of the other coding are refused."""
    import numpy as np

    gen = torch.Generator().manual_seed(1)
    s = torch.randn(40, generator=gen, dtype=torch.float64)
    y = [int(i % 4 == 0) for i in range(40)]  # 10 relevant
    order = sorted(range(40), key=lambda i: -float(s[i]))
    pos_ranks = sorted(order.index(i) for i in range(40) if y[i])
    median = pos_ranks[len(pos_ranks) // 2]
    pairs = [(float(s[i]), float(s[j])) for i in range(40) if y[i] for j in range(40) if not y[j]]
    want = {
        "k": 10,
        "p_at_k": sum(y[i] for i in order[:10]) / 10,
        "ap": sum((n + 1) / (r + 1) for n, r in enumerate(pos_ranks)) / 10,
        "above_median": sum(1 for r in range(median) if not y[order[r]]),
        "auroc": sum(a > b for a, b in pairs) / len(pairs),
    }
    for labels in (y, np.array(y), torch.tensor(y), [bool(v) for v in y], np.array(y) == 1):
        for scores in (s, s.tolist(), s.numpy()):
            m = pool_metrics(scores, labels)
            assert m.keys() == want.keys()
            assert m == pytest.approx(want)
    planted = [1 if v else (0 if i % 4 == 1 else -1) for i, v in enumerate(y)]
    with pytest.raises(
        ValueError, match="labels \\[-1\\] are not 'relevant' labels.*coding='planted'"
    ):
        pool_metrics(s, planted)
    m = pool_metrics(s, planted, coding="planted")
    assert m["p_at_k"] == want["p_at_k"] and {"clean_above_median", "auroc_planted"} <= m.keys()
    with pytest.raises(ValueError, match="39 labels for 40 scores"):
        pool_metrics(s, y[:-1])
    with pytest.raises(ValueError, match="labels \\[2\\] are not 'planted'"):
        pool_metrics(s, [2] + y[1:], coding="planted")
    with pytest.raises(ValueError, match="coding='decoy' is not one of"):
        pool_metrics(s, y, coding="decoy")


def test_pool_metrics_difference_is_paired_on_the_same_resamples():
    gen = torch.Generator().manual_seed(0)
    lab = torch.tensor([1] * 12 + [0] * 12 + [-1] * 76)
    truth = (lab == 1).double()
    a = truth + 0.8 * torch.randn(100, generator=gen, dtype=torch.float64)
    b = truth + 1.5 * torch.randn(100, generator=gen, dtype=torch.float64)
    d = pool_metrics_difference(a, b, lab, n_boot=300, seed=4, coding="planted")
    # the point values are the two rankings' own metrics, subtracted
    ma, mb = pool_metrics(a, lab, coding="planted"), pool_metrics(b, lab, coding="planted")
    assert d["k"] == 12
    assert d["p_at_k"] == pytest.approx(ma["p_at_k"] - mb["p_at_k"])
    assert d["ap"] == pytest.approx(ma["ap"] - mb["ap"])
    # pairing: each resample scores both rankings, so swapping them mirrors every interval
    # exactly, and a ranking against itself differs by exactly zero on every resample
    r = pool_metrics_difference(b, a, lab, n_boot=300, seed=4, coding="planted")
    assert r["ap_ci"] == pytest.approx([-d["ap_ci"][1], -d["ap_ci"][0]])
    assert r["p_at_k_ci"] == pytest.approx([-d["p_at_k_ci"][1], -d["p_at_k_ci"][0]])
    z = pool_metrics_difference(a, a, lab, n_boot=50, coding="planted")
    assert z["p_at_k_ci"] == [0.0, 0.0] and z["ap_ci"] == [0.0, 0.0]
    # the paired interval is narrower than the two rankings' own intervals put together, and a
    # ranking that puts every label-1 example first beats the noisy one on every resample
    ia, ib = (
        pool_metrics(a, lab, n_boot=300, seed=4, coding="planted"),
        pool_metrics(b, lab, n_boot=300, seed=4, coding="planted"),
    )
    width = d["ap_ci"][1] - d["ap_ci"][0]
    assert width < (ia["ap_ci"][1] - ia["ap_ci"][0]) + (ib["ap_ci"][1] - ib["ap_ci"][0])
    perfect = pool_metrics_difference(truth, b, lab, n_boot=100, coding="planted")
    assert perfect["ap_ci"][0] > 0
    with pytest.raises(ValueError, match="one of each per pool example"):
        pool_metrics_difference(a, b[:-1], lab, coding="planted")


# ----------------------------------------------------------------------------- cache fixture


@pytest.fixture(scope="module")
def pool(tiny, train_records, tmp_path_factory):
    out = tmp_path_factory.mktemp("pool")
    cache = lensattr.build_cache(
        tiny, train_records, out=out, layers=[1, 3], shard_size=5, progress=False
    )
    return cache


@pytest.fixture(scope="module")
def stats(tiny, pair_records):
    return pair_stats(
        tiny, pair_records, stats=lensattr.build.DEFAULT_STATS, layers=[1, 3], batch_size=4
    )


# ------------------------------------------------------------------------------------ moments


def test_pool_moments_equal_the_rows_and_follow_the_cache_not_the_path(
    tiny, train_records, tmp_path, monkeypatch
):
    monkeypatch.setattr(lensattr.moments, "PERSIST_ROWS", 0)  # keep them on disk at any size
    c1 = lensattr.build_cache(tiny, train_records, out=tmp_path / "c", layers=[2], progress=False)
    rows = c1.stat("resid_post", 2)[:].double()
    m = pool_moments(c1, "resid_post", 2)
    assert torch.allclose(m.mean, rows.mean(0), atol=1e-10)
    assert torch.allclose(m.cov, torch.cov(rows.T), atol=1e-8)
    lensattr.moments._MEMO.clear()  # read back from the file (fp32 covariance)
    back = pool_moments(c1, "resid_post", 2)
    assert torch.allclose(back.cov, torch.cov(rows.T), rtol=1e-6, atol=1e-8)
    f = tmp_path / "c" / "moments-resid_post-2.safetensors"
    assert f.exists() and not list((tmp_path / "c").glob(".moments*"))
    # another cache rebuilt at the same path: its own moments, never the old ones
    other = [dict(r, response=r["response"] + " again") for r in train_records[:7]]
    import shutil

    shutil.rmtree(tmp_path / "c")
    c2 = lensattr.build_cache(tiny, other, out=tmp_path / "c", layers=[2], progress=False)
    rows2 = c2.stat("resid_post", 2)[:].double()
    assert torch.allclose(pool_moments(c2, "resid_post", 2).mean, rows2.mean(0), atol=1e-10)
    # a moments file copied from another cache, or torn, is ignored and recomputed
    lensattr.moments._MEMO.clear()
    good = f.read_bytes()
    f.write_bytes(good[: len(good) // 2])
    assert torch.allclose(pool_moments(c2, "resid_post", 2).mean, rows2.mean(0), atol=1e-10)
    lensattr.moments._MEMO.clear()
    (tmp_path / "c1").mkdir()
    c1b = lensattr.build_cache(tiny, train_records, out=tmp_path / "c1", layers=[2])
    shutil.copy(f, tmp_path / "c1" / f.name)  # c2's moments beside c1's rows
    assert torch.allclose(pool_moments(c1b, "resid_post", 2).mean, rows.mean(0), atol=1e-10)


# ------------------------------------------------------------------------------------- scores


@pytest.mark.parametrize(
    "g", ["cosine", "dot", "centered_cosine", "whitened_cosine", "deflated_cosine"]
)
def test_batched_scores_equal_one_query_at_a_time_and_the_direct_formula(g):
    gen = torch.Generator().manual_seed(1)
    scale = torch.cat([torch.full((10,), 5.0), torch.ones(14)])  # 10 dominant directions
    basis = torch.linalg.qr(torch.randn(24, 24, generator=gen))[0]
    x = (torch.randn(60, 24, generator=gen) * scale) @ basis.T + 3.0
    queries = torch.randn(24, 3, generator=gen)
    ctx = ScoreContext(pool=Moments.of_rows(x))
    fn = registry.get_score(g).fn
    both = fn(x, x.norm(dim=1), queries, ctx)
    for j in range(3):
        assert torch.allclose(both[:, j], fn(x, x.norm(dim=1), queries[:, j], ctx), atol=1e-5)
    m = ctx.moments()
    xc = x.double() - x.double().mean(0)
    p = queries[:, 0].double()
    cos = torch.nn.functional.cosine_similarity
    if g == "centered_cosine":
        want = cos(xc, p[None], dim=1)
    elif g == "whitened_cosine":
        evals, evecs = torch.linalg.eigh(torch.cov(x.double().T))
        lam = 0.01 * evals.sum() / 24
        w = evecs @ torch.diag((evals + lam).rsqrt()) @ evecs.T
        want = cos(xc @ w, (w @ p)[None], dim=1)
    elif g == "deflated_cosine":
        u = torch.linalg.svd(xc, full_matrices=False).Vh[:10].T  # top-10 principal directions
        proj = torch.eye(24, dtype=torch.float64) - u @ u.T
        want = cos(xc @ proj, (proj @ p)[None], dim=1)
    else:
        return
    assert torch.allclose(both[:, 0].double(), want, atol=1e-4)
    assert m.n == 60


# ------------------------------------------------------------------------- pool-aware query


def test_pool_contrast_is_treatment_mean_minus_pool_mean(tiny, pool, stats):
    q = lensattr.behavior_query(tiny, stats, query="pool_contrast", stat="resid_post", pool=pool)
    for layer in (1, 3):
        t, _ = stats.sides("resid_post", layer)
        want = t.double().mean(0) - pool.stat("resid_post", layer)[:].double().mean(0)
        assert torch.allclose(q.vector(layer).double(), want / want.norm(), atol=1e-5)
    assert q.pool is not None
    with pytest.raises(QueryError, match="pool"):
        lensattr.behavior_query(tiny, stats, query="pool_contrast")
    with pytest.raises(QueryError, match="contrast"):
        lensattr.behavior_query(tiny, stats, query="residual_change", stat="grad")


def test_a_pool_aware_query_is_refused_on_another_cache(tiny, pool, stats, train_records, tmp_path):
    q = lensattr.behavior_query(tiny, stats, query="pool_contrast", pool=pool)
    other = lensattr.build_cache(tiny, train_records[:6], out=tmp_path, layers=[1, 3])
    with pytest.raises(lensattr.CacheError, match="another pool"):
        lensattr.rank(other, q, layer=1)
    assert len(lensattr.rank(pool, q, layer=1, top_k=3)) == 3


# ------------------------------------------------------------------------------------ ranking


def test_rank_breaks_ties_by_row_and_never_ranks_a_nonfinite_score_first(pool, stats, tiny):
    q = lensattr.behavior_query(tiny, stats, layers=[1, 3])

    first = pool.stat("residual_change", 1)[0].float()

    @registry.register_score("test_ties")
    def ties(rows, norms, query, ctx=None):
        s = (rows[:, 0] > 0).float()  # two values only: ties everywhere
        s[(rows == first).all(1)] = float("nan")  # cache row 0
        return s

    try:
        orders = {
            tuple(lensattr.rank(pool, q, layer=1, score="test_ties", top_k=None, chunk_rows=c).ids)
            for c in (1, 2, 5, 100)
        }
        assert len(orders) == 1
        ids = orders.pop()
        assert ids[-1] == pool.ids[0]  # NaN last
        s = (pool.stat("residual_change", 1)[:].float()[:, 0] > 0).float()
        want = sorted(range(1, len(pool)), key=lambda i: (-float(s[i]), i))
        assert list(ids[:-1]) == [pool.ids[i] for i in want]
        low = lensattr.rank(pool, q, layer=1, score="test_ties", top_k=3, bottom=True)
        assert pool.ids[0] not in low.ids and low.n_nonfinite == 1
    finally:
        registry.SCORE.pop("test_ties")


def test_rank_over_a_subset_of_rows_and_bad_k(pool, stats, tiny):
    q = lensattr.behavior_query(tiny, stats, layers=[1, 3])
    full = lensattr.rank(pool, q, layer=3, top_k=None)
    sub = [1, 4, 5, 9]
    r = lensattr.rank(pool, q, layer=3, top_k=None, rows=sub)
    assert r.ids == [i for i in full.ids if pool.ids.index(i) in sub]
    for k in (0, -1):
        with pytest.raises(ValueError, match="top_k"):
            lensattr.rank(pool, q, layer=3, top_k=k)
    # a hook name and a negative index name the same layer
    a = lensattr.rank(pool, q, layer="blocks.3.hook_resid_post", top_k=3)
    assert a.ids == lensattr.rank(pool, q, layer=-1, top_k=3).ids == full.ids[:3]


# -------------------------------------------------------------------------- query validation


def test_query_load_refuses_nan_zero_and_non_unit_vectors(tiny, stats, tmp_path):
    q = lensattr.behavior_query(tiny, stats, layers=[1, 3])
    for bad in (torch.full((32,), float("nan")), torch.zeros(32), torch.ones(32) * 1e15):
        from safetensors.torch import load_file, save_file

        q.save(tmp_path / "q.safetensors")
        t = load_file(str(tmp_path / "q.safetensors"))
        t["layer/1"] = bad
        from safetensors import safe_open

        with safe_open(str(tmp_path / "q.safetensors"), framework="pt") as fh:
            meta = fh.metadata()
        save_file(t, str(tmp_path / "bad.safetensors"), meta)
        with pytest.raises(QueryError, match="layer 1"):
            Query.load(tmp_path / "bad.safetensors")


def test_best_layer_with_one_pair_is_an_error_not_layer_zero(tiny, pair_records):
    q = lensattr.behavior_query(tiny, pair_records[:1], layers=[1, 3])
    with pytest.raises(QueryError, match="1 pair"):
        q.best_layer()
    assert lensattr.behavior_query(tiny, pair_records[:1], layers=[2]).best_layer() == 2


# ------------------------------------------------------------------------------------- select


def test_held_out_accuracy_is_one_definition(pool, stats):
    """The batched accuracy of `evaluate` equals `heldout_accuracy`, for every candidate."""
    table = evaluate(stats, pool, candidates(pool.stats), [1, 3])
    assert len(table) == len(candidates(pool.stats)) * 2
    for row in table[::7]:
        m = Method.parse(row["method"])
        t, c = stats.sides(m.stat, row["layer"])
        ctx = ScoreContext(pool, m.stat, row["layer"])
        acc = heldout_accuracy(t, c, registry.get_query(m.query), registry.get_score(m.score), ctx)
        assert row["accuracy"] == pytest.approx(acc)


def direct_criterion(pool, stats, layers):
    """``pool_contrast|resid_post|centered_cosine``'s criterion from its definition, in double
    precision and Python loops; each row's score is the mean of its scores at ``layers``."""
    cos = torch.nn.functional.cosine_similarity
    log_ranks, aurocs = [], []
    n = stats.n_pairs
    for k in range(4):
        test = list(range(k, n, 4))
        train = [i for i in range(n) if i not in test]
        pool_s, ctrl_s, treat_s = [0.0] * len(pool), [0.0] * len(test), [0.0] * len(test)
        for layer in layers:
            t, c = stats.sides("resid_post", layer)
            x = pool.stat("resid_post", layer)[:].double()
            mu = x.mean(0)
            q = t[train].double().mean(0) - mu
            for out, rows in ((pool_s, x), (ctrl_s, c[test].double()), (treat_s, t[test].double())):
                for i, v in enumerate(rows):
                    out[i] += float(cos(v[None] - mu, q[None])) / len(layers)
        neg = pool_s + ctrl_s  # recall in the top q of the negatives, averaged over log q
        ranks = [(1 + sum(v >= s for v in neg)) / (len(neg) + 1) for s in treat_s]
        log_ranks.append(sum(math.log(1 / r) for r in ranks) / len(ranks) / math.log(len(neg) + 1))
        aurocs.append(sum(s > v for s in treat_s for v in ctrl_s) / len(treat_s) / len(ctrl_s))
    return sum(log_ranks) / 4 * sum(aurocs) / 4


def test_criterion_equals_a_direct_computation(pool, stats):
    m = Method("pool_contrast", "resid_post", "centered_cosine")
    (row,) = evaluate(stats, pool, [m], [3])
    assert 0 < row["criterion"] <= 1
    assert row["criterion"] == pytest.approx(direct_criterion(pool, stats, [3]), abs=1e-4)


def test_a_layer_sets_criterion_is_that_of_its_layers_mean_score(pool, stats):
    """``layer_set`` scores each row by the mean of its scores at the method's best layers
    (best first), on the same folds: checked against the definition in double precision."""
    from lensattr.criterion import layer_set

    m = Method("pool_contrast", "resid_post", "centered_cosine")
    table = evaluate(stats, pool, [m], [1, 3])
    row = layer_set(stats, pool, table, m)
    by_crit = sorted(table, key=lambda r: (r["criterion"], r["accuracy"], r["layer"]))[::-1]
    assert row["layer"] == tuple(r["layer"] for r in by_crit)
    assert row["criterion"] == pytest.approx(direct_criterion(pool, stats, [1, 3]), abs=1e-4)
    assert row["criterion"] != pytest.approx(by_crit[0]["criterion"])  # not a layer's own
    assert layer_set(stats, pool, table, m, size=1) is None
    assert layer_set(stats, pool, table[:1], m) is None  # one layer: no set


@pytest.mark.parametrize(
    "method",
    [
        "pool_contrast|residual_change|cosine",  # its two layers together beat its best one
        "residual_change|residual_change|cosine",  # its best layer alone is higher
    ],
)
def test_select_ranks_by_a_layer_set_only_when_its_criterion_is_higher(
    tiny, pool, stats, method, tmp_path
):
    from lensattr.criterion import layer_set

    sel = select(tiny, pool, stats, methods=[method])
    single = max(sel.table, key=lambda r: (r["criterion"], r["accuracy"], r["layer"]))
    together = layer_set(stats, pool, sel.table, Method.parse(method))
    assert sel.layer_set == together
    won = together["criterion"] > single["criterion"]
    assert sel.layer == (together["layer"] if won else single["layer"])
    assert isinstance(sel.layer, tuple) is won
    assert sel.layers == (sel.layer if won else (sel.layer,))
    assert "layers together (L" in sel.summary()
    # rank scores the set as the mean of its layers' scores; a saved query keeps its set
    r = lensattr.rank(pool, sel, top_k=None)
    each = [lensattr.rank(pool, sel.query, layer=la, top_k=None) for la in sel.layers]
    rows = range(len(pool))
    mean = torch.stack([e.scores_of(rows) for e in each]).mean(0)
    assert r.layer == sel.layer and torch.allclose(r.scores_of(rows), mean, atol=1e-6)
    sel.query.save(tmp_path / "q.safetensors")
    loaded = Query.load(tmp_path / "q.safetensors")
    assert loaded.layer == sel.layer and loaded.best_layer() == sel.layer
    one = select(tiny, pool, stats, methods=[method], set_size=1)
    assert one.layer == single["layer"] and one.layer_set is None


def test_a_query_whose_chosen_layer_it_lacks_is_refused(pool, stats, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    q = lensattr.behavior_query(None, stats, layers=[1, 3])
    q.layer = (3, 2)
    with pytest.raises(QueryError, match="chosen layer 2 is not one of its layers"):
        q.best_layer()
    q.layer = (3, 1)
    q.save(tmp_path / "q.safetensors")
    with safe_open(str(tmp_path / "q.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    save_file(
        load_file(str(tmp_path / "q.safetensors")),
        str(tmp_path / "bad.safetensors"),
        {**meta, "layer": '["3"]'},
    )
    with pytest.raises(QueryError, match="bad.safetensors: .*field 'layer'"):
        Query.load(tmp_path / "bad.safetensors")


def test_log_rank_grows_with_the_log_of_the_negatives_above():
    """One treatment with ``k`` of ``n`` negatives at or above it: ``1 - log(k+1)/log(n+1)``, so
    ten of the pool's own behaviour examples above it cost far less than in an average
    precision (which they cut to 1/11)."""
    from lensattr.criterion import heldout_ap, heldout_log_rank

    neg = torch.cat([torch.full((10,), 2.0), torch.zeros(989)])
    t = torch.tensor([1.0])
    assert heldout_log_rank(t, neg) == pytest.approx(1 - math.log(11) / math.log(1000))
    assert heldout_ap(t, neg) == pytest.approx(1 / 11)
    assert heldout_log_rank(t, neg[10:]) == 1.0 == heldout_ap(t, neg[10:])


def test_select_chooses_the_best_candidate_and_ranks_with_it(tiny, pool, stats, pair_records):
    sel = select(tiny, pool, stats, ensemble=1)  # the one chosen method
    means = {}
    for r in sel.table:
        means.setdefault(r["method"], []).append(r["criterion"])
    method = max(means, key=lambda m: sum(means[m]) / len(means[m]))
    best = max((r for r in sel.table if r["method"] == method),
               key=lambda r: (r["criterion"], r["accuracy"], r["layer"]))  # fmt: skip
    if sel.layer_set["criterion"] > best["criterion"]:  # its layers together
        best = sel.layer_set
    assert (str(sel.method), sel.layer) == (best["method"], best["layer"])
    assert sel.query.layer == sel.layer and sel.query.score == sel.method.score
    assert "auto chose" in sel.summary()
    r = lensattr.rank(pool, sel, top_k=4)
    assert (r.layer, r.score, r.stat) == (sel.layer, sel.method.score, sel.method.stat)
    # by default auto ranks with its ensemble, also from pairs directly (`method="auto"`)
    r1 = lensattr.rank(pool, select(tiny, pool, stats), top_k=4)
    r2 = lensattr.rank(pool, pair_records, method="auto", model=tiny, top_k=4)
    assert r2.ids == r1.ids and r2.score == "mean_zscore"


def test_auto_offers_a_covariance_inverse_only_on_a_pool_of_four_rows_a_dimension(
    tiny, pool, stats, pair_records, tmp_path
):
    """12 rows in 32 dimensions: the covariance is singular, so ``whitened_cosine`` is left out
    of the default candidates (named explicitly, it is scored); 128 rows: it is offered; 127
    (ill-conditioned): it is not."""
    from lensattr.registry import get_score
    from lensattr.select import ROWS_PER_DIMENSION, candidates, offered

    assert ROWS_PER_DIMENSION == 4
    w = get_score("whitened_cosine")
    assert not offered(w, 127, 32) and offered(w, 128, 32) and offered(get_score("cosine"), 1, 32)

    whitened = {str(m) for m in candidates(pool.stats) if m.score == "whitened_cosine"}
    assert len(pool) <= pool.d_model and whitened
    sel = select(tiny, pool, stats)
    assert set(sel.left_out) == whitened
    assert not whitened & {r["method"] for r in sel.table}
    assert "not offered: whitened_cosine (it inverts the pool's covariance, and 12 rows" in (
        sel.summary()
    )
    named = select(tiny, pool, stats, methods=sorted(whitened))
    assert not named.left_out and {r["method"] for r in named.table} == whitened
    rng = torch.Generator().manual_seed(0)
    big = [
        {
            "id": f"b{i}",
            "prompt": "Hi",
            "response": "ok " * int(torch.randint(1, 9, (1,), generator=rng)),
        }
        for i in range(ROWS_PER_DIMENSION * pool.d_model)
    ]
    wide = lensattr.build_cache(
        tiny, big, out=tmp_path, layers=[1], stats=["resid_post"], progress=False
    )
    sel = select(tiny, wide, pair_records)
    assert not sel.left_out
    assert "pool_contrast|resid_post|whitened_cosine" in {r["method"] for r in sel.table}


def test_select_refuses_bad_input(tiny, pool, stats, pair_records):
    with pytest.raises(QueryError, match="at least 4"):
        select(tiny, pool, pair_records[:3])
    with pytest.raises(QueryError, match="pool has 1"):
        select(tiny, pool, stats, rows=[0])
    with pytest.raises(KeyError, match="unknown score"):
        select(tiny, pool, stats, methods=["contrast|resid_post|nope"])
    with pytest.raises(ValueError, match="model"):
        lensattr.rank(pool, pair_records, method="auto")


def test_a_constant_score_earns_no_credit(pool, stats):
    @registry.register_score("test_const")
    def const(rows, norms, query, ctx=None):
        return torch.zeros(len(rows))

    try:
        (row,) = evaluate(stats, pool, [Method("residual_diff", "resid_post", "test_const")], [1])
        n_neg = len(pool) + len(range(0, stats.n_pairs, 4))
        assert row["criterion"] < 2 / n_neg  # every tie goes against the treatments
        assert row["accuracy"] == 0.0
    finally:
        registry.SCORE.pop("test_const")


def test_a_plugin_query_and_score_are_candidates_by_name(pool, stats):
    @registry.register_query("test_treatment_only", stat="resid_post", stats=("resid_post",))
    def treatment_only(t, c, pool=None):
        return t

    @registry.register_score("test_neg_cos")
    def neg(rows, norms, query, ctx=None):
        return -(rows @ query) / norms.clamp(min=1e-12)

    try:
        names = {str(m) for m in candidates(pool.stats)}
        assert "test_treatment_only|resid_post|test_neg_cos" in names
        table = evaluate(
            stats, pool, [Method("test_treatment_only", "resid_post", "test_neg_cos")], [1]
        )
        assert 0 <= table[0]["criterion"] <= 1
    finally:
        registry.QUERY.pop("test_treatment_only")
        registry.SCORE.pop("test_neg_cos")


def test_candidates_cover_every_query_stat_score_once():
    ms = candidates(["residual_change", "resid_post", "grad"])
    keys = [(m.query, m.stat, m.score) for m in ms]
    assert len(keys) == len(set(keys))
    assert ("residual_change", "residual_change", "cosine") in keys
    assert not any(p == "unit_contrast" and s == "residual_change" for p, s, _ in keys)  # PAPER
    assert not any(p == "persona" for p, _, _ in keys)
    stats_by_query = {p: {s for q, s, _ in keys if q == p} for p, _, _ in keys}
    assert stats_by_query["pool_contrast"] == {"residual_change", "resid_post", "grad"}
    assert all(
        len({g for q, s, g in keys if (q, s) == k}) == len(registry.SCORE)
        for k in itertools.product(stats_by_query, ["resid_post"])
        if k[1] in stats_by_query[k[0]]
    )


def test_a_query_captured_with_other_settings_is_refused_naming_the_field(tiny, pool, pair_records):
    q = lensattr.behavior_query(tiny, pair_records, layers=[1], max_length=64)
    with pytest.raises(lensattr.CacheError, match="max_length=64.*max_length=512"):
        lensattr.rank(pool, q, layer=1)
    with pytest.raises(lensattr.CacheError, match="max_length"):
        select(tiny, pool, pair_stats(tiny, pair_records, layers=[1], max_length=64))


def test_select_then_cache_ranks_as_the_full_cache_would(
    tiny, train_records, pair_records, tmp_path
):
    """Choose on a sample, cache only the choice: the ranking equals that of a full cache."""
    from lensattr.select import select_then_cache

    cache, q, sel = select_then_cache(
        tiny, train_records, pair_records, out=tmp_path / "one", sample=6, ensemble=1
    )
    assert cache.layers == [sel.layer] and cache.stats == [sel.method.stat]
    full = lensattr.build_cache(tiny, train_records, out=tmp_path / "all", progress=False)
    m = sel.method
    ref = lensattr.behavior_query(
        tiny, pair_records, query=m.query, stat=m.stat, pool=full, score=m.score
    )
    got = lensattr.rank(cache, q, top_k=None)
    want = lensattr.rank(full, ref, layer=sel.layer, top_k=None)
    assert got.ids == want.ids
    assert torch.allclose(got.scores, want.scores, atol=1e-5)
    # the default, an ensemble: its members' statistics and layers cached, each member refitted
    # against the full cache, the same ranking as on a full cache
    cache, ens, sel = select_then_cache(
        tiny, train_records, pair_records, out=tmp_path / "two", sample=6
    )
    assert isinstance(ens, lensattr.Ensemble) and sel.ensemble is not None
    assert cache.layers == list(sel.layers) and cache.stats == list(sel.stats)
    refs = []
    for member in sel.ensemble.members:
        ref = lensattr.behavior_query(
            tiny, pair_records, query=member.rule, stat=member.stat, pool=full, score=member.score
        )
        ref.layer = member.layer
        refs.append(ref)
    got = lensattr.rank(cache, ens, top_k=None)
    want = lensattr.rank(full, lensattr.Ensemble(refs), top_k=None)
    assert got.ids == want.ids
    assert torch.allclose(got.scores, want.scores, atol=1e-4)
    with pytest.raises(ValueError, match="sample"):
        select_then_cache(tiny, train_records, pair_records, out=tmp_path / "x", sample=0)


def test_scores_of_returns_each_rows_score_in_the_order_asked(pool, stats, tiny):
    q = lensattr.behavior_query(tiny, stats, layers=[3])
    rows = pool.stat("residual_change", 3)[:].float()
    direct = torch.nn.functional.cosine_similarity(rows, q.vector(3)[None], dim=1)
    r = lensattr.rank(pool, q, layer=3, top_k=None, chunk_rows=4)
    assert torch.allclose(r.scores_of(range(len(pool))), direct, atol=1e-5)
    assert torch.allclose(r.scores_of([5, 0, 2]), direct[[5, 0, 2]], atol=1e-5)
    with pytest.raises(KeyError, match="not in this ranking"):
        lensattr.rank(pool, q, layer=3, top_k=2).scores_of(range(len(pool)))


def test_select_then_cache_of_the_whole_corpus_is_select_on_one_forward_only_build(
    tiny, train_records, pair_records, tmp_path, monkeypatch
):
    """``sample=None``: one build (forward passes only, every layer, the gradient-free
    statistic), and the choice and ranking are ``select``'s on a gradient build's cache
    restricted to the gradient-free methods (issue 14)."""
    import lensattr.build as cache_mod
    from lensattr.select import candidates, select_then_cache

    def refuse(*args, **kwargs):
        raise AssertionError("the gradient-free path ran a backward")

    builds: list[list[str]] = []
    real_build = cache_mod.build_cache

    def counting_build(*args, **kwargs):
        builds.append(list(kwargs.get("stats", [])))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "backward", refuse)
    monkeypatch.setattr(torch.autograd, "grad", refuse)
    monkeypatch.setattr(cache_mod, "build_cache", counting_build)
    cache, q, sel = select_then_cache(
        tiny, train_records, pair_records, out=tmp_path / "one", sample=None
    )
    monkeypatch.undo()
    assert builds == [["resid_post"]]  # no second build
    assert cache.layers == list(range(tiny.n_layers)) and cache.stats == ["resid_post"]
    full = lensattr.build_cache(tiny, train_records, out=tmp_path / "all", progress=False)
    free = [m for m in candidates(full.stats) if m.stat == "resid_post"]
    free = [m for m in free if str(m) not in sel.left_out]  # the same 12-row pool
    ref = select(tiny, full, pair_records, methods=free)
    assert (sel.method, sel.layer) == (ref.method, ref.layer)
    assert [r["criterion"] for r in sel.table] == [r["criterion"] for r in ref.table]
    got = lensattr.rank(cache, q, top_k=None)
    want = lensattr.rank(full, ref, top_k=None)
    assert got.layer == want.layer and got.score == want.score == "mean_zscore"
    assert got.ids == want.ids
    assert torch.allclose(got.scores, want.scores, atol=1e-5)
    # a sample as large as the corpus takes the same single-build path
    builds.clear()
    monkeypatch.setattr(cache_mod, "build_cache", counting_build)
    select_then_cache(tiny, train_records, pair_records, out=tmp_path / "two", sample=99)
    assert builds == [["resid_post"]]


def test_select_then_cache_captures_the_sample_once(
    tiny, train_records, pair_records, tmp_path, monkeypatch
):
    """The final build copies the sample's rows (``reuse=``): every training example is
    captured exactly once over the two builds, and the sample's rows are the sample cache's."""
    import lensattr.build as cache_mod
    from lensattr.select import select_then_cache

    captured: list[int] = []
    kept: dict[str, lensattr.Cache] = {}
    real_capture, real_build = cache_mod.capture, cache_mod.build_cache

    def counting(model, batch, *args, **kwargs):
        captured.append(batch.input_ids.shape[0])
        return real_capture(model, batch, *args, **kwargs)

    def keeping(model, train, **kwargs):
        cache = real_build(model, train, **kwargs)
        if kwargs.get("reuse") is not None:  # the final build: the sample's rows, still open
            src = kwargs["reuse"]
            stat, layer = cache.stats[0], cache.layers[0]
            for i, row in enumerate(src.ids):
                j = cache.ids.index(row)
                assert torch.equal(cache.stat(stat, layer)[j], src.stat(stat, layer)[i])
            kept["sample"] = src
        return cache

    monkeypatch.setattr(cache_mod, "capture", counting)
    monkeypatch.setattr(cache_mod, "build_cache", keeping)
    cache, _, _ = select_then_cache(tiny, train_records, pair_records, out=tmp_path / "c", sample=5)
    assert "sample" in kept and len(kept["sample"]) == 5
    assert sum(captured) == len(train_records) == len(cache)
