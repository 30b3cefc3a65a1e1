"""The command line end to end on the tiny model."""

import json
from pathlib import Path

import pytest
import torch

import lensattr
from lensattr import open_cache, rank
from lensattr.baselines import lexical_scores, lexical_select
from lensattr.cli import main
from lensattr.demo import bundled


def test_cache_query_rank_end_to_end(tmp_path, train_records, pair_records, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in train_records))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_records))
    common = ["--model", "tiny-random", "--device", "cpu", "--quiet", "--layers", "1,3"]
    assert main(["cache", *common, "--train", str(train), "--out", str(tmp_path / "c")]) == 0
    assert main(["query", *common, "--pairs", str(pairs), "--out", str(tmp_path / "q.st")]) == 0
    out = tmp_path / "ranked.jsonl"
    assert (
        main(
            [
                "rank",
                "--cache",
                str(tmp_path / "c"),
                "--query",
                str(tmp_path / "q.st"),
                "--layer",
                "3",
                "--top-k",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert all(a["score"] >= b["score"] for a, b in zip(rows, rows[1:], strict=False))
    by_id = {r["id"]: r for r in train_records}
    assert rows[0]["example"]["messages"][-1]["content"] == (
        by_id[rows[0]["id"]].get("response") or by_id[rows[0]["id"]]["messages"][-1]["content"]
    )
    assert "wrote 4 ranked examples" in capsys.readouterr().out
    # several layers, comma-separated: the Python API's mean over them
    both = tmp_path / "both.jsonl"
    args = ["rank", "--cache", str(tmp_path / "c"), "--query", str(tmp_path / "q.st")]
    assert main([*args, "--layer", "1,-1", "--top-k", "4", "--out", str(both)]) == 0
    rows = [json.loads(line) for line in both.read_text().splitlines()]
    ref = rank(open_cache(tmp_path / "c"), str(tmp_path / "q.st"), layer=[1, 3], top_k=4)
    assert [r["id"] for r in rows] == ref.ids and all(r["layer"] == [1, 3] for r in rows)


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text('{"id": "a", "prompt": "p", "response": "r"}\n{"id": "b", "prompt": 3}\n')
    code = main(
        [
            "cache",
            "--model",
            "tiny-random",
            "--train",
            str(train),
            "--out",
            str(tmp_path / "c"),
            "--quiet",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"{train}:2" in err and "'prompt'" in err


def test_demo_runs_on_the_tiny_model(tmp_path, capsys):
    assert main(["demo", "--model", "tiny-random", "--out", str(tmp_path), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "auto chose" in text and "top-10 of 264" in text
    assert (
        "the paper's method as its authors ran it" in text
        and "planted (label 1) in the top-10" in text
    )
    assert (tmp_path / "layer_sweep.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["auto"]["top10"]) == 10 and len(summary["auto"]["sweep"]) == 4
    assert summary["paper"]["method"] == "residual_change|residual_change|cosine"
    # text search and RepSim beside them, each at its setting chosen without labels
    lex, rep = summary["lexical"], summary["repsim"]
    assert f"text search ({lex['kind']}" in text and "RepSim (repsim|resid_post|cosine)" in text
    examples = lensattr.load_examples(bundled("demo/train.jsonl"))
    pairs = lensattr.load_pairs(bundled("demo/query.jsonl"))
    texts, t, c = (
        [e.response for e in examples],
        [p.treatment for p in pairs],
        [p.control for p in pairs],
    )
    assert lexical_select(texts, t, c)[0] == lex["kind"]
    labels = torch.tensor([int(e.extra.get("label", -1)) for e in examples])
    want = lensattr.pool_metrics(lexical_scores(texts, t, c, lex["kind"]), labels, coding="planted")
    assert lex["p_at_k"] == want["p_at_k"] and lex["ap"] == pytest.approx(want["ap"])
    assert rep["method"] == "repsim|resid_post|cosine" and len(rep["sweep"]) == 4


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(c in text for c in ("cache", "query", "rank", "demo"))


def test_cli_auto_and_the_chosen_layer(tmp_path, train_records, pair_records, capsys):
    """`query` prints held-out accuracy and the layer; `rank` uses it without --layer; auto
    chooses from the pairs and the cache alone."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in train_records))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_records))
    common = ["--model", "tiny-random", "--device", "cpu", "--quiet"]
    cache = str(tmp_path / "c")
    assert main(["cache", *common, "--layers", "1,2,3", "--train", str(train), "--out", cache]) == 0
    q = str(tmp_path / "q.st")
    assert main(["query", *common, "--layers", "1,2,3", "--pairs", str(pairs), "--out", q]) == 0
    text = capsys.readouterr().out
    assert "held-out accuracy per layer" in text
    from lensattr import Query

    best = Query.load(q).best_layer()
    assert f"layer used by `lensattr rank` by default: {best}" in text
    out = tmp_path / "r.jsonl"
    for layer in ([], ["--layer", "best"]):
        assert main(["rank", "--cache", cache, "--query", q, *layer, "--out", str(out)]) == 0
        assert json.loads(out.read_text().splitlines()[0])["layer"] == best
    assert main(["rank", "--cache", cache, "--query", q, "--layer", "-1", "--out", str(out)]) == 0
    assert json.loads(out.read_text().splitlines()[0])["layer"] == 3
    # auto, saved as a query and straight from pairs: the same choice and ranking
    qa = str(tmp_path / "auto.st")
    assert (
        main(
            [
                "query",
                *common,
                "--pairs",
                str(pairs),
                "--method",
                "auto",
                "--cache",
                cache,
                "--out",
                qa,
            ]
        )
        == 0
    )
    from lensattr import Ensemble

    ens = Ensemble.load(qa)  # auto saves its ensemble of top methods, each with its layer
    text = capsys.readouterr().out
    assert "auto chose" in text and f"ensemble of {len(ens.members)} queries" in text
    assert main(["rank", "--cache", cache, "--query", qa, "--out", str(out)]) == 0
    first = out.read_text()
    # an ensemble ranks each member at its own layer: a --layer is refused in one line
    assert main(["rank", "--cache", cache, "--query", qa, "--layer", "1", "--out", qa + ".j"]) == 2
    assert "its own layer" in capsys.readouterr().err
    assert (
        main(
            [
                "rank",
                *common,
                "--cache",
                cache,
                "--pairs",
                str(pairs),
                "--method",
                "auto",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.read_text() == first
    # one-line errors: auto without a cache, --pairs without auto, neither query nor pairs
    assert main(["query", *common, "--pairs", str(pairs), "--method", "auto", "--out", qa]) == 2
    assert main(["rank", "--cache", cache, "--pairs", str(pairs), "--out", str(out)]) == 2
    assert main(["rank", "--cache", cache, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--cache" in err and "--method auto" in err and err.count("\n") == 3


def test_help_lists_the_registered_choices(capsys):
    with pytest.raises(SystemExit):
        main(["query", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "pool_contrast" in text and "deflated_cosine" in text


def test_rank_prints_from_the_cache_not_the_train_file(tmp_path, train_records, pair_records):
    """A moved train file does not matter, and extra fields come out with the example."""
    recs = [dict(r, source=f"src{i}") for i, r in enumerate(train_records)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in recs))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_records))
    common = ["--model", "tiny-random", "--device", "cpu", "--quiet", "--layers", "2"]
    cache, q, out = str(tmp_path / "c"), str(tmp_path / "q.st"), tmp_path / "r.jsonl"
    assert main(["cache", *common, "--train", str(train), "--out", cache]) == 0
    assert main(["query", *common, "--pairs", str(pairs), "--out", q]) == 0
    train.rename(tmp_path / "moved.jsonl")
    assert main(["rank", "--cache", cache, "--query", q, "--top-k", "3", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    by_id = {r["id"]: r for r in recs}
    assert [r["example"]["source"] for r in rows] == [by_id[r["id"]]["source"] for r in rows]


@pytest.fixture
def ranked(tmp_path, train_records, pair_records):
    """A cache at layers 1 and 2 of records with a label, and a query: paths."""
    recs = [dict(r, label=i % 2) for i, r in enumerate(train_records)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in recs))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_records))
    common = ["--model", "tiny-random", "--device", "cpu", "--quiet", "--layers", "1:3"]
    cache, q = str(tmp_path / "c"), str(tmp_path / "q.st")
    assert main(["cache", *common, "--train", str(train), "--out", cache]) == 0
    assert main(["query", *common, "--pairs", str(pairs), "--out", q]) == 0
    return cache, q, {r["id"]: r for r in recs}


def test_rank_prints_a_table_without_out(ranked, capsys):
    """Issue 27 item 9: the top-k as a table (id, score, label, reply), the method and layer
    named; --out optional; a range of layers as in `cache --layers`."""
    cache, q, by_id = ranked
    capsys.readouterr()
    assert main(["rank", "--cache", cache, "--query", q, "--layer", "1:3", "--top-k", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ref = rank(open_cache(cache), q, layer=[1, 2], top_k=4)
    assert lines[0] == (
        f"4 of {len(by_id)} examples ranked by residual_change|residual_change|cosine at the "
        "mean of layers 1,2:"
    )
    assert lines[1].split() == ["rank", "id", "score", "label", "text"]
    for i, (line, eid, score) in enumerate(
        zip(lines[2:], ref.ids, ref.scores.tolist(), strict=True)
    ):
        rank_, id_, score_, label, *text = line.split()
        assert (int(rank_), id_, score_) == (i + 1, eid, f"{score:+.4f}")
        assert int(label) == by_id[eid]["label"]
        rec = by_id[eid]
        reply = " ".join((rec.get("response") or rec["messages"][-1]["content"]).split())
        assert reply.startswith(" ".join(text).removesuffix("..."))
    assert len(lines) == 6  # no jsonl written, nothing else printed


def test_rank_jsonl_names_the_method(ranked, tmp_path):
    cache, q, _ = ranked
    out = tmp_path / "r.jsonl"
    assert main(["rank", "--cache", cache, "--query", q, "--layer", "-2", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 12 and {r["layer"] for r in rows} == {2}  # -2: of the 4-block model
    assert {r["method"] for r in rows} == {"residual_change|residual_change|cosine"}
    assert main(["rank", "--cache", cache, "--query", q, "--layer", "-1"]) == 2  # block 3


def test_explain_prints_highlighted_tokens(ranked, capsys, tiny):
    """`lensattr explain`: the same tokens and contributions as :func:`lensattr.explain`."""
    from lensattr import Query, explain

    cache, _, by_id = ranked
    q = str(Path(cache).parent / "contrast.st")  # a statistic pooled over the reply alone
    common = ["--model", "tiny-random", "--device", "cpu", "--quiet", "--layers", "1:3"]
    pairs = ["--pairs", str(Path(cache).parent / "pairs.jsonl"), "--query", "contrast"]
    assert main(["query", *common, *pairs, "--stat", "resid_post", "--out", q]) == 0
    capsys.readouterr()
    base = ["explain", "--model", "tiny-random", "--device", "cpu", "--cache", cache]
    assert main([*base, "--query", q, "--ids", "ex3,ex5", "--color", "never"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ex = open_cache(cache).examples(["ex3", "ex5"])
    for i, one in enumerate(ex):
        e = explain(
            tiny, one, Query.load(q), max_length=open_cache(cache).capture_config.max_length
        )
        assert lines[2 * i] == (
            f"{one.id}: mean token contribution {e.total:+.4g} ({len(e.tokens)} reply tokens)"
        )
        assert lines[2 * i + 1] == "  " + e.text()
        assert "[[" in e.text() and "".join(e.tokens) == e.text().replace("[[", "").replace(
            "]]", ""
        ).replace("((", "").replace("))", "")
    assert main([*base, "--query", q, "--top", "1", "--color", "always"]) == 0
    assert "\x1b[48;5;" in capsys.readouterr().out
    assert main([*base, "--query", q, "--ids", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_cache_says_already_built_and_how_to_cache_other_data(tmp_path, train_records, capsys):
    """Issue 27 item 14: an identical rerun says so; other data into the same directory names
    the fix (another --out)."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in train_records))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in train_records[:-1]))
    args = ["cache", "--model", "tiny-random", "--device", "cpu", "--quiet", "--layers", "1"]
    out = ["--out", str(tmp_path / "c")]
    assert main([*args, "--train", str(train), *out]) == 0
    assert capsys.readouterr().out.startswith(f"cached {len(train_records)} examples x 1 layers")
    assert main([*args, "--train", str(train), *out]) == 0
    assert capsys.readouterr().out.startswith("already built, nothing to do: ")
    assert main([*args, "--train", str(other), *out]) == 2
    err = capsys.readouterr().err
    assert "holds a different cache: train" in err and "choose another out directory (--out)" in err
    assert err.count("\n") == 1
