"""The command line end to end on the tiny model."""

import json

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
    want = lensattr.pool_metrics(lexical_scores(texts, t, c, lex["kind"]), labels)
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
