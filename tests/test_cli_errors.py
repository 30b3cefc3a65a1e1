"""Every failure the CLI foresees is one line on stderr naming the file and what to do (rc 2).

Failures that need a full disk, a read-only mount or a network are provoked by making the call
that would meet them raise the same ``OSError`` the system raises.
"""

import errno
import fcntl
import json
from pathlib import Path

import pytest

import lensattr.backends.models
import lensattr.build
import lensattr.store.cache
from lensattr.cli import main


@pytest.fixture
def train(tmp_path, train_records) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train_records[:4]))
    return path


def cache_cmd(train: Path, out: Path, *extra: str) -> list[str]:
    return ["cache", "--model", "tiny-random", "--device", "cpu", "--quiet", "--layers", "1",
            "--stats", "resid_post", "--train", str(train), "--out", str(out), *extra]  # fmt: skip


def one_line_error(capsys, code: int, *needles: str) -> str:  # noqa: ANN001
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _raiser(exc: BaseException):  # noqa: ANN202
    def fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise exc

    return fail


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        (errno.ENOSPC, "no space left on the device"),
        (errno.EROFS, "read-only file system: choose a writable location"),
        (errno.EACCES, "permission denied"),
        (errno.EDQUOT, "disk quota exceeded"),
    ],
)
def test_write_failures_name_the_file(tmp_path, train, capsys, monkeypatch, code, hint):
    shard = str(tmp_path / "c" / "shard-00000.safetensors")
    monkeypatch.setattr(
        lensattr.store.cache, "write_shard", _raiser(OSError(code, "os says", shard))
    )
    rc = main(cache_cmd(train, tmp_path / "c"))
    one_line_error(capsys, rc, f"lensattr cache: error: {shard}: {hint}")


def test_out_is_an_existing_file(tmp_path, train, capsys):
    (tmp_path / "c").write_text("not a directory")
    rc = main(cache_cmd(train, tmp_path / "c"))
    one_line_error(capsys, rc, str(tmp_path / "c"), "already exists")


def test_missing_train_file(tmp_path, capsys):
    rc = main(cache_cmd(tmp_path / "nope.jsonl", tmp_path / "c"))
    one_line_error(capsys, rc, str(tmp_path / "nope.jsonl"))


def test_no_network(tmp_path, train, capsys, monkeypatch):
    monkeypatch.setattr(
        lensattr.backends.models,
        "load_model",
        _raiser(ConnectionError("Max retries exceeded: hf.co")),
    )
    rc = main(cache_cmd(train, tmp_path / "c"))
    one_line_error(capsys, rc, "could not reach the network", "HF_HUB_OFFLINE=1")


def test_type_error_is_one_line(tmp_path, train, capsys, monkeypatch):
    monkeypatch.setattr(lensattr.build, "load_examples", _raiser(TypeError("bad\nvalue")))
    rc = main(cache_cmd(train, tmp_path / "c"))
    one_line_error(capsys, rc, "bad value", "rerun with -v")


def test_verbose_adds_the_traceback(tmp_path, train, capsys, monkeypatch):
    monkeypatch.setattr(lensattr.build, "load_examples", _raiser(TypeError("bad")))
    assert main(["-v", *cache_cmd(train, tmp_path / "c")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_corrupt_query_file(tmp_path, train, capsys):
    assert main(cache_cmd(train, tmp_path / "c")) == 0
    capsys.readouterr()
    query = tmp_path / "q.safetensors"
    query.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header!!}")
    rc = main(["rank", "--cache", str(tmp_path / "c"), "--query", str(query), "--out",
               str(tmp_path / "r.jsonl")])  # fmt: skip
    one_line_error(capsys, rc, str(query))


def test_empty_train_file(tmp_path, capsys):
    empty = tmp_path / "train.jsonl"
    empty.write_text("\n \n")
    rc = main(cache_cmd(empty, tmp_path / "c"))
    one_line_error(capsys, rc, f"{empty}: no examples")


@pytest.mark.parametrize(
    ("flag", "value", "problem"),
    [
        ("--batch-size", "-1", "batch_size must be a positive integer, not -1"),
        ("--shard-size", "0", "shard_size must be a positive integer, not 0"),
        ("--max-length", "-5", "max_length must be a positive integer"),
        ("--compute-dtype", "int3", "compute_dtype 'int3' is not a dtype"),
        ("--layers", "99", "out of range"),
        ("--layers", "blocks.2.hook_banana", "unknown hook name hook_banana"),  # issue 27 item 4
        ("--layers", "1:9", "out of range for a model with 4 blocks"),
    ],
)
def test_bad_sizes(tmp_path, train, capsys, flag, value, problem):
    rc = main(cache_cmd(train, tmp_path / "c", flag, value))
    one_line_error(capsys, rc, problem)
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_a_second_writer(tmp_path, train, capsys):
    out = tmp_path / "c"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        rc = main(cache_cmd(train, out))
    one_line_error(capsys, rc, f"{out}: another lensattr build is writing")


def test_corrupt_cache(tmp_path, train, capsys):
    out = tmp_path / "c"
    assert main(cache_cmd(train, out)) == 0
    capsys.readouterr()
    (out / "manifest.json").write_text(
        (out / "manifest.json").read_text().replace('"ex0"', '"ex9"')
    )
    rc = main(cache_cmd(train, out))
    one_line_error(capsys, rc, "manifest.json: checksum mismatch")


def test_interrupt_says_how_to_resume(tmp_path, train, capsys, monkeypatch):
    monkeypatch.setattr(lensattr.build, "_build_chunk", _raiser(KeyboardInterrupt()))
    assert main(cache_cmd(train, tmp_path / "c")) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err


def test_an_unforeseen_error_keeps_its_traceback(tmp_path, train, monkeypatch):
    class Bug(Exception):
        pass

    monkeypatch.setattr(lensattr.build, "load_examples", _raiser(Bug("a bug")))
    with pytest.raises(Bug):
        main(cache_cmd(train, tmp_path / "c"))


def test_dtype_spellings_on_the_command_line(tmp_path, train, capsys):
    # Issue 12.7: `lensattr cache --dtype bf16` was an AttributeError traceback.
    out = tmp_path / "c"
    assert main(cache_cmd(train, out, "--compute-dtype", "bf16", "--storage-dtype", "fp32")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["storage_dtype"] == "float32"
    assert "cached 4 examples" in capsys.readouterr().out
