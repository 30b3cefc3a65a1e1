"""benchmarks/choice_study.py: its "select" rule among the candidates select offers reproduces
select's table and choice (from the same fold scores and choice rule, which
tests/test_select.py checks against direct computations), its other rules are registered
criteria that select chooses by when named, and its in-sample moments are the moments of the
pool plus the pairs (given to fold_scores, no module patched)."""

import pytest
import torch

import benchmarks.choice_study as cs
import lensattr
from lensattr.criterion import DEFAULT_CRITERION
from lensattr.moments import Moments
from lensattr.query import pair_stats


def test_the_study_reproduces_select_and_its_in_sample_moments(
    tiny, train_records, pair_records, tmp_path
):
    cache = lensattr.build_cache(tiny, train_records, out=tmp_path, layers=[1, 3], progress=False)
    ps = pair_stats(tiny, pair_records, stats=cache.stats, layers=[1, 3], batch_size=4)
    labels = torch.tensor([1, 0] + [-1] * (len(cache) - 2))
    cells = cs.study(cache, ps, None, labels, in_sample=False)
    sel = lensattr.select(tiny, cache, ps, set_size=1)  # the cells: one layer each
    offered = [c for c in cells if cs.offered_by_select(c, cache)]
    assert {c["method"] for c in offered} == {r["method"] for r in sel.table}
    got = cs.choose(offered, DEFAULT_CRITERION)
    assert (got["method"], got["layer"]) == (str(sel.method), sel.layer)
    crit = {(r["method"], r["layer"]): r["criterion"] for r in sel.table}
    assert all(c[DEFAULT_CRITERION] == crit[(c["method"], c["layer"])] for c in offered)
    assert all(0 <= c["p_at_k"] <= 1 and 0 <= c["log_rank"] <= 1 for c in cells)
    # another rule, by name: select chooses what the study's cells say it would
    by_ap = lensattr.select(tiny, cache, ps, set_size=1, criterion="ap_all")
    assert by_ap.criterion == "ap_all" and "AP among pool + controls" in by_ap.summary()
    assert {(r["method"], r["layer"]): r["criterion"] for r in by_ap.table} == {
        (c["method"], c["layer"]): c["ap_all"] for c in offered
    }
    got = cs.choose(offered, "ap_all")
    assert (got["method"], got["layer"]) == (str(by_ap.method), by_ap.layer)
    # the diagnosis leaves the label-1 row out of the negatives: no treatment can rank lower
    assert all(c["ap_oracle"] >= c["ap_all"] - 1e-12 for c in cells)
    assert any(c["ap_oracle"] > c["ap_all"] for c in cells)
    # layer sets: a one-layer set is the cell itself; every set is scored on the same folds
    sets = cs.layer_sets(cache, ps, None, labels, str(sel.method))
    best = sets["best layer"]
    assert best["layers"] == [sel.layer]
    assert abs(best["criterion"] - crit[(str(sel.method), sel.layer)]) < 1e-9
    cell = next(c for c in cells if (c["method"], c["layer"]) == (str(sel.method), sel.layer))
    assert (best["p_at_k"], best["ap"]) == (cell["p_at_k"], cell["ap"])
    assert sorted(sets["all"]["layers"]) == [1, 3]
    # select's own layer set (its method's best 3 of the 2 layers) is the study's "top 3"
    together = lensattr.select(tiny, cache, ps).layer_set
    assert list(together["layer"]) == sets["top 3"]["layers"]
    assert abs(together["criterion"] - sets["top 3"]["criterion"]) < 1e-9
    # in-sample moments: exactly those of the pool's rows and every pair side together
    m = cs.with_pairs_in_moments(cache, ps)("resid_post", 3, torch.tensor([0]))
    rows = torch.cat([cache.stat("resid_post", 3)[:].double(), *ps.sides("resid_post", 3)])
    ref = Moments.of_rows(rows)
    assert m.n == len(rows)
    assert torch.allclose(m.mean, ref.mean) and torch.allclose(m.cov, ref.cov, atol=1e-8)
    inside = cs.study(cache, ps, None, labels, in_sample=True)
    key = ("pool_contrast|resid_post|whitened_cosine", 3)
    crit = {(c["method"], c["layer"]): c["ap_all"] for c in cells}
    crit_in = {(c["method"], c["layer"]): c["ap_all"] for c in inside}
    assert crit_in[key] != crit[key]  # the pairs' moments reached the scores
    cos = ("residual_diff|resid_post|cosine", 3)
    assert crit_in[cos] == crit[cos]  # a score without the pool's moments is unchanged
    assert lensattr.criterion.fold_scores.__module__ == "lensattr.criterion"  # nothing patched
    assert {
        (c["method"], c["layer"]): c["ap_all"] for c in cs.study(cache, ps, None, labels, False)
    } == crit
    # each fold's own sides in the moments: a score without the pool's moments is unchanged,
    # one with them is not
    fold_in = {
        (c["method"], c["layer"]): c["ap_all"]
        for c in cs.study(cache, ps, None, labels, False, True)
    }
    assert fold_in[cos] == crit[cos] and fold_in[key] != crit[key]


def test_the_pu_corrected_criterion_takes_the_pools_behaviour_share_out_of_the_negatives():
    from lensattr.criterion import heldout_ap

    t = torch.tensor([5.0, 4.0, 3.0, 2.0])  # held-out treatments
    c = torch.tensor([0.5, 0.4, 0.3, 0.2])
    clean = torch.linspace(-3.0, 1.0, 88)
    # the pool's top treatment scores above every pool row: no share can be estimated, and the
    # criterion is select's
    assert cs._ap_pu(clean, t, c) == pytest.approx(heldout_ap(t, torch.cat([clean, c])))
    # twelve pool rows distributed as the treatments (the pool's own behaviour examples,
    # unlabelled): the share is estimated at 12 / 100 and they leave the negatives, so the
    # criterion is what it would be without them
    own = t.repeat_interleave(3) + 1e-3  # three just above each treatment
    pool = torch.cat([clean, own])
    assert heldout_ap(t, torch.cat([pool, c])) < cs._ap_pu(pool, t, c)
    assert cs._ap_pu(pool, t, c) == pytest.approx(heldout_ap(t, torch.cat([clean, c])))
