"""One vocabulary: the cached vector is the statistic (``stat``), the rule that builds a query
from pairs the query (``query``; a built query names it as its ``rule``), the scoring rule the
score (``score``). Nothing was released, so no old spelling (the paper's symbols ``phi``, ``psi``
and ``g`` as ``phi=``, ``psi=``, ``g=``, ``.phi``, ``.psi``, ``.g``, ``--phi``, ``--psi``,
``--g``, ``register_phi``, ``PSI``; ``dtype=``; a moved module path) is kept: each is refused."""

import json
from pathlib import Path

import pytest
import torch

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
    # built on resid_post, ranked against resid_post: a query ranks only its own statistic
    q = behavior_query(tiny, pair_records, query="residual_diff", layers=[1, 2], score="dot")
    q.save(out / "q.safetensors")
    return cache, q, out


def test_rank_takes_stat_and_score_only(cq):
    cache, q, _ = cq
    r = rank(cache, q, layer=2, stat="resid_post", score="dot", top_k=None)
    assert (r.stat, r.score) == ("resid_post", "dot")
    x = cache.stat("resid_post", 2)[:].float()
    want = x @ q.vector(2)  # dot: <x, q>
    assert torch.allclose(r.scores_of(range(len(cache))), want, atol=1e-5)
    for old in ({"phi": "resid_post"}, {"g": "dot"}):
        with pytest.raises(TypeError, match="unexpected keyword"):
            rank(cache, q, layer=2, **old)
    with pytest.raises(AttributeError):
        _ = r.phi  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        _ = r.g  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        _ = r.psi  # type: ignore[attr-defined]
    assert r.rule == q.rule == "residual_diff"


def test_query_method_explain_and_build_cache_have_one_name_each(tiny, pair_records, cq, tmp_path):
    _, q, out = cq
    assert Query.load(out / "q.safetensors").score == "dot"
    with pytest.raises(TypeError, match=r"takes no options \['g'\]"):
        behavior_query(tiny, pair_records, layers=[2], g="dot")
    with pytest.raises(AttributeError):
        _ = q.g  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match=r"takes no options \['psi'\]"):
        behavior_query(tiny, pair_records, layers=[2], psi="contrast")
    with pytest.raises(AttributeError):
        _ = q.psi  # type: ignore[attr-defined]
    meta = Query.load(out / "q.safetensors").metadata()
    assert meta["rule"] == "residual_diff" and "psi" not in meta
    m = Method.parse("pool_contrast|resid_post|centered_cosine")
    assert m == Method("pool_contrast", "resid_post", "centered_cosine")
    with pytest.raises(AttributeError):
        _ = m.g  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        _ = m.psi  # type: ignore[attr-defined]
    assert m.query == "pool_contrast"
    with pytest.raises(ValueError, match="write it as 'query|stat|score'"):
        Method.parse("a|b")
    with pytest.raises(TypeError, match="unexpected keyword"):
        explain(tiny, EX, q, 2, phi="resid_post")
    with pytest.raises(TypeError, match="unexpected keyword"):
        build_cache(tiny, [EX], out=tmp_path / "c", layers=[1], dtype=torch.float32)


@pytest.mark.parametrize(
    "old",
    ["backend", "bridge", "cache", "capture", "loss", "models", "names", "reader", "records"]
    + ["sites", "builtins", "_deprecated"],
)
def test_no_moved_module_path_remains(old):
    import lensattr

    package = Path(lensattr.__file__).parent
    assert not (package / f"{old}.py").exists() and not (package / old).is_dir()
    assert callable(lensattr.capture)  # the function; no module of that name shadows it


def test_cli_stat_and_score(cq, tmp_path, capsys):
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
    for flag in ("--phi", "--psi", "--g"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["query", "--pairs", "p", "--out", "q", flag, "dot"])
        assert "unrecognized arguments" in capsys.readouterr().err


def test_the_registries_have_one_name_each():
    import lensattr
    from lensattr import registry

    for old in ("register_phi", "register_psi"):
        assert not hasattr(lensattr, old) and not hasattr(registry, old)
    for old in ("get_phi", "get_psi", "PHI", "PSI", "Phi", "Psi", "PhiFn", "PsiFn"):
        assert not hasattr(registry, old)
    assert callable(lensattr.register_stat) and callable(lensattr.register_query)
    assert "contrast" in registry.names("query") and "resid_post" in registry.names("stat")
    for old in ("phi", "psi"):
        with pytest.raises(KeyError):
            registry.names(old)
    with pytest.raises(KeyError, match="unknown query 'nope'"):
        registry.get_query("nope")
    with pytest.raises(KeyError, match="unknown statistic 'nope'"):
        registry.get_stat("nope")
