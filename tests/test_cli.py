"""The command line end to end on the tiny model."""

import json

import pytest

from lensattr.cli import main


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
    assert (
        "top-10 of 264" in text
        and "residual-difference query" in text
        and "planted (label 1) in the top-10" in text
    )
    assert (tmp_path / "layer_sweep.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["top10"]) == 10 and len(summary["sweep"]) == 4


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(c in text for c in ("cache", "query", "rank", "demo"))
