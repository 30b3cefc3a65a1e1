"""One vocabulary: the cached vector is the statistic (``stat``), the scoring rule the score
(``score``). The old spellings (``phi=``, ``g=``, ``.g``, ``.phi``, ``--phi``, ``--g``) still
work for one release and each emits a DeprecationWarning naming the new one."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lensattr import Method, Query, behavior_query, build_cache, explain, rank
from lensattr.cli import build_parser, main

EX = {"id": "x", "prompt": "Q", "response": "Sure"}


@pytest.fixture(scope="module")
def cq(tiny, train_records, pair_records, tmp_path_factory):
    out = tmp_path_factory.mktemp("voc")
    cache = build_cache(
        tiny,
        train_records[:8],
        out=out / "c",
        layers=[1, 2],
        stats=["resid_post", "residual_change"],
        progress=False,
    )
    q = behavior_query(tiny, pair_records, layers=[1, 2], score="dot")
    q.save(out / "q.safetensors")
    return cache, q, out


def test_rank_phi_and_g_are_deprecated_names_of_stat_and_score(cq):
    cache, q, _ = cq
    new = rank(cache, q, layer=2, stat="resid_post", score="projection", top_k=None)
    assert (new.stat, new.score) == ("resid_post", "projection")
    with pytest.warns(DeprecationWarning, match=r"rank\(phi=...\) is deprecated: use stat="):
        old = rank(cache, q, layer=2, phi="resid_post", score="projection", top_k=None)
    assert old.ids == new.ids and torch.equal(old.scores, new.scores)
    with pytest.warns(DeprecationWarning, match=r"rank\(g=...\) is deprecated: use score="):
        old = rank(cache, q, layer=2, stat="resid_post", g="projection", top_k=None)
    assert old.ids == new.ids and torch.equal(old.scores, new.scores)
    with pytest.raises(TypeError, match="got score= and its deprecated name g="):
        rank(cache, q, layer=2, score="cosine", g="dot")


def test_ranking_phi_and_g_attributes(cq):
    cache, q, _ = cq
    r = rank(cache, q, layer=2, top_k=3)
    assert (r.stat, r.score) == ("residual_change", "dot")  # the query's own
    with pytest.warns(DeprecationWarning, match=r"Ranking.phi is deprecated: use .stat"):
        assert r.phi == "residual_change"
    with pytest.warns(DeprecationWarning, match=r"Ranking.g is deprecated: use .score"):
        assert r.g == "dot"


def test_behavior_query_g_and_query_g(tiny, pair_records):
    with pytest.warns(DeprecationWarning, match=r"behavior_query\(g=...\) is deprecated"):
        q = behavior_query(tiny, pair_records, layers=[2], g="dot")
    assert q.score == "dot"
    with pytest.warns(DeprecationWarning, match=r"Query.g is deprecated: use .score"):
        assert q.g == "dot"
    with pytest.warns(DeprecationWarning, match=r"Query.g is deprecated"):
        q.g = "cosine"
    assert q.score == "cosine"


def test_explain_phi(tiny, cq):
    _, q, _ = cq
    new = explain(tiny, EX, q, 2, stat="resid_post")
    with pytest.warns(DeprecationWarning, match=r"explain\(phi=...\) is deprecated: use stat="):
        old = explain(tiny, EX, q, 2, phi="resid_post")
    assert torch.equal(old.contributions, new.contributions)
    assert not torch.equal(explain(tiny, EX, q, 2).contributions, new.contributions)


def test_method_g():
    m = Method.parse("pool_contrast|resid_post|centered_cosine")
    assert m == Method("pool_contrast", "resid_post", "centered_cosine")
    assert m.score == "centered_cosine"
    with pytest.warns(DeprecationWarning, match=r"Method.g is deprecated: use .score"):
        assert m.g == "centered_cosine"
    with pytest.raises(ValueError, match="write it as 'psi|stat|score'"):
        Method.parse("a|b")


def test_a_query_saved_with_g_loads(cq, tmp_path):
    _, q, out = cq
    path = tmp_path / "old.safetensors"
    with safe_open(str(out / "q.safetensors"), framework="pt") as fh:
        meta = dict(fh.metadata())
    assert meta["score"] == "dot"
    meta["g"] = meta.pop("score")  # how a query was saved before the rename
    save_file(load_file(str(out / "q.safetensors")), str(path), meta)
    assert Query.load(path).score == "dot"


def test_cli_stat_score_and_their_old_flags(cq, tmp_path, capsys):
    cache, q, out = cq
    base = ["rank", "--cache", str(cache.path), "--query", str(out / "q.safetensors")]
    base += ["--layer", "2", "--top-k", "3", "--out"]
    assert (
        main([*base, str(tmp_path / "new.jsonl"), "--stat", "resid_post", "--score", "cosine"]) == 0
    )
    rows = [json.loads(x) for x in (tmp_path / "new.jsonl").read_text().splitlines()]
    assert {(r["stat"], r["score_name"]) for r in rows} == {("resid_post", "cosine")}
    ref = rank(cache, q, layer=2, stat="resid_post", score="cosine", top_k=3)
    assert [r["id"] for r in rows] == ref.ids
    with pytest.warns(DeprecationWarning) as caught:
        rc = main([*base, str(tmp_path / "old.jsonl"), "--phi", "resid_post", "--g", "cosine"])
    said = {str(w.message) for w in caught}
    assert {"--phi is deprecated: use --stat", "--g is deprecated: use --score"} <= said
    assert rc == 0 and "--g is deprecated" in capsys.readouterr().err
    assert (tmp_path / "old.jsonl").read_text() == (tmp_path / "new.jsonl").read_text()
    with pytest.warns(DeprecationWarning, match="--g is deprecated: use --score"):
        args = build_parser().parse_args(["query", "--pairs", "p", "--out", "q", "--g", "dot"])
    assert args.score == "dot"
