"""Crash safety and integrity of the cache: SIGKILL + resume, checksums, model/layer/pooling checks.

The SIGKILL test runs real builds in subprocesses (one thread each, so that the numbers are
reproducible bit for bit), kills one several times while it writes shards, reruns it, and compares
every file of the result byte for byte with an uninterrupted build.
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lensattr import behavior_query, build_cache, load_model, open_cache, rank
from lensattr.data import DataError
from lensattr.store.cache import CacheError
from lensattr.testing import tiny_hf_model, tiny_tokenizer

LAYERS = [1, 3]

BUILD_SCRIPT = textwrap.dedent(
    """
    import sys
    from lensattr import build_cache

    for out in sys.argv[2:]:  # the same build into each directory in turn
        build_cache("tiny-random", sys.argv[1], out=out, layers=[1, 3], shard_size=2,
                    batch_size=2, max_length=64, progress=False)
    """
)


def files(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (hidden ones included), by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def assert_same_cache(a: Path, b: Path) -> None:
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb), "the two caches hold different files"
    for name in fa:
        assert fa[name] == fb[name], f"{name} differs"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny, train_records):
    """A finished 4-shard cache of the 12 training records (and its training file)."""
    root = tmp_path_factory.mktemp("built")
    train = write_jsonl(root / "train.jsonl", train_records)
    out = root / "cache"
    build_cache(tiny, train, out=out, layers=LAYERS, shard_size=3, batch_size=2, max_length=64)
    return train, out


def fresh_copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name, data in files(src).items():
        (dst / name).write_bytes(data)
    return dst


def rebuild(tiny, train: Path, out: Path, **kw):  # noqa: ANN201
    return build_cache(
        tiny, train, out=out, layers=LAYERS, shard_size=3, batch_size=2, max_length=64, **kw
    )


# ------------------------------------------------------------------------------------- SIGKILL


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run_and_kill(script: Path, train: Path, outs: list[Path], when) -> bool:  # noqa: ANN001
    """Run the build script and SIGKILL it as soon as ``when(outs[0])`` holds; True if killed."""
    cmd = [sys.executable, str(script), str(train), *map(str, outs)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if outs[0].exists() and when(outs[0]):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.002)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _n_shards(out: Path) -> int:
    return sum(1 for p in out.glob("shard-*.safetensors"))


def _writing(out: Path) -> bool:
    """A temporary file exists: the build is in the middle of writing a shard or sidecar."""
    return any(p.name.endswith(".tmp") for p in out.iterdir())


def test_sigkill_and_rerun_is_bitwise_identical(tmp_path, train_records):
    recs = [{**r, "id": f"{r['id']}-{k}"} for k, r in enumerate(train_records * 3)]  # 18 shards
    train = write_jsonl(tmp_path / "train.jsonl", recs)
    script = tmp_path / "build.py"
    script.write_text(BUILD_SCRIPT)
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"

    # Kill early (after the first shards), then mid-write if the poll catches a temporary file
    # (else once most shards exist).
    kills = _run_and_kill(script, train, [crashed], lambda d: _n_shards(d) >= 2)
    kills += _run_and_kill(script, train, [crashed], lambda d: _writing(d) or _n_shards(d) >= 10)
    assert kills == 2, "the build finished before it could be killed"
    assert 2 <= _n_shards(crashed) < 18
    with pytest.raises(CacheError, match="unfinished build"):
        open_cache(crashed)
    # The same command again finishes the build; the same process then builds a clean copy.
    assert not _run_and_kill(script, train, [crashed, clean], lambda d: False)
    assert_same_cache(clean, crashed)
    cache = open_cache(crashed)  # every checksum verified
    assert len(cache) == len(recs) and cache.ids == [r["id"] for r in recs]


# ------------------------------------------- resume from every state a kill can leave behind


def test_resume_after_shard_without_sidecar(tmp_path, tiny, built):
    train, ref = built
    out = fresh_copy(ref, tmp_path / "c")
    (out / "manifest.json").unlink()
    (out / "shard-00002.json").unlink()  # killed between the shard's rename and its sidecar
    (out / "shard-00003.json").unlink()
    (out / "shard-00003.safetensors").unlink()  # ... and before the last shard
    rebuild(tiny, train, out)
    assert_same_cache(ref, out)


def test_resume_after_torn_temporary_files(tmp_path, tiny, built):
    train, ref = built
    out = fresh_copy(ref, tmp_path / "c")
    (out / "manifest.json").unlink()
    data = (out / "shard-00001.safetensors").read_bytes()
    (out / "shard-00001.safetensors").unlink()
    (out / "shard-00001.json").unlink()
    (out / ".shard-00001.safetensors.tmp").write_bytes(data[: len(data) // 2])  # torn write
    (out / ".manifest.json.tmp").write_text('{"schema_ver')  # killed while writing the manifest
    rebuild(tiny, train, out)
    assert_same_cache(ref, out)  # no stray temporary file is left either


def test_resume_redoes_a_shard_that_does_not_match_its_sidecar(tmp_path, tiny, built):
    train, ref = built
    out = fresh_copy(ref, tmp_path / "c")
    (out / "manifest.json").unlink()
    shard = out / "shard-00000.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 0xFF
    shard.write_bytes(bytes(blob))
    (out / "shard-00001.json").write_text("{not json")
    rebuild(tiny, train, out)
    assert_same_cache(ref, out)


def test_finished_build_is_a_noop(tmp_path, tiny, built):
    train, ref = built
    out = fresh_copy(ref, tmp_path / "c")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rebuild(tiny, train, out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_shards_are_written_through_a_temporary_file_and_rename(tmp_path, tiny, monkeypatch):
    import lensattr.store.records as records
    import lensattr.store.shards as store

    renames: list[tuple[str, str]] = []
    real = os.replace

    def spy(src, dst):  # noqa: ANN001, ANN202
        # The temporary name is unique to the writer: ".{name}.{pid}-{random}.tmp".
        tmp = re.fullmatch(
            rf"\.{re.escape(Path(dst).name)}\.{os.getpid()}-[0-9a-f]{{8}}\.tmp", Path(src).name
        )
        renames.append((Path(dst).name if tmp else f"unexpected {src}", Path(dst).name))
        return real(src, dst)

    monkeypatch.setattr(store.os, "replace", spy)
    monkeypatch.setattr(records.os, "replace", spy)
    recs = [{"id": f"e{i}", "prompt": "Hi", "response": "Yo"} for i in range(3)]
    build_cache(tiny, recs, out=tmp_path / "c", layers=[1], shard_size=2)
    assert ("shard-00000.safetensors", "shard-00000.safetensors") in renames
    assert ("shard-00001.json", "shard-00001.json") in renames
    assert ("records.jsonl.gz", "records.jsonl.gz") in renames
    assert renames[-1] == ("manifest.json", "manifest.json")  # the manifest comes last
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------- missing / corrupt shards


def test_manifest_records_a_checksum_per_shard(built):
    from lensattr.store.shards import sha256_file

    _, out = built
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) == 4
    for info in manifest["shards"]:
        assert info["sha256"] == sha256_file(out / info["file"])


def flip_byte_in(shard: Path, key: str) -> None:
    """Flip one bit of one stored value of tensor ``key`` (the header stays intact)."""
    from lensattr.store.shards import MappedShard

    m = MappedShard(shard)
    begin, end = m.info(key)["data_offsets"]
    pos = m.header_size + (begin + end) // 2
    del m
    blob = bytearray(shard.read_bytes())
    blob[pos] ^= 0x01
    shard.write_bytes(bytes(blob))


def test_corrupt_shard_byte_is_detected(tmp_path, built):
    _, ref = built
    out = fresh_copy(ref, tmp_path / "c")
    flip_byte_in(out / "shard-00001.safetensors", "grad/3")
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors.*checksum"):
        open_cache(out, verify="full")  # every byte now
    cache = open_cache(out)  # sizes and headers now; each tensor when first read
    cache.stat("grad", 1)  # intact tensors read fine
    with pytest.raises(
        CacheError, match=r"shard-00001\.safetensors: checksum mismatch in 'grad/3'"
    ):
        cache.stat("grad", 3)


def test_rerun_of_a_finished_build_verifies_and_never_ranks_corrupt_rows(
    tmp_path, tiny, built, pair_records
):
    # Issue 11.6: the README flow (build_cache, then rank) reran on a corrupt cache ranked it.
    train, ref = built
    out = fresh_copy(ref, tmp_path / "c")
    flip_byte_in(out / "shard-00002.safetensors", "residual_change/1")
    q = behavior_query(tiny, pair_records, layers=[1], max_length=64)
    cache = rebuild(tiny, train, out)
    with pytest.raises(CacheError, match=r"shard-00002\.safetensors: checksum mismatch"):
        rank(cache, q, layer=1)
    header = out / "shard-00000.safetensors"
    blob = bytearray(header.read_bytes())
    blob[20] ^= 0x01  # inside the JSON header
    header.write_bytes(bytes(blob))
    with pytest.raises(CacheError, match=r"shard-00000\.safetensors"):
        rebuild(tiny, train, out)  # the header is checked on every open


def test_a_tensor_is_hashed_once_per_open(tmp_path, built, monkeypatch):
    from lensattr.store.shards import MappedShard

    _, ref = built
    calls = []
    real = MappedShard.tensor_sha256
    monkeypatch.setattr(
        MappedShard, "tensor_sha256", lambda self, k: (calls.append(k), real(self, k))[1]
    )
    cache = open_cache(ref)
    assert calls == []
    cache.stat("grad", 1)
    cache.stat("grad", 1)
    assert sorted(calls) == sorted(["grad/1", "grad/1/norm"] * 4)  # 4 shards, once each
    open_cache(ref, verify=False).stat("grad", 1)
    assert len(calls) == 8


def test_truncated_shard_is_detected_without_checksums(tmp_path, built):
    _, ref = built
    out = fresh_copy(ref, tmp_path / "c")
    shard = out / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CacheError, match=r"shard-00002\.safetensors.*truncated"):
        open_cache(out, verify=False)


def test_missing_shard_is_a_clear_error(tmp_path, built):
    _, ref = built
    out = fresh_copy(ref, tmp_path / "c")
    (out / "shard-00003.safetensors").unlink()
    with pytest.raises(CacheError, match=r"shard-00003\.safetensors: shard missing"):
        open_cache(out)


def test_missing_or_corrupt_manifest(tmp_path, built):
    _, ref = built
    out = fresh_copy(ref, tmp_path / "c")
    (out / "manifest.json").write_text('{"schema_version": 1, "sha')
    with pytest.raises(CacheError, match=r"manifest\.json: corrupt manifest"):
        open_cache(out)
    (out / "manifest.json").unlink()
    with pytest.raises(CacheError, match="no manifest.json.*unfinished build"):
        open_cache(out)
    with pytest.raises(CacheError, match="not a finished lensattr cache"):
        open_cache(tmp_path)


# ---------------------------------------------------- model / tokenizer / layers / pooling


@pytest.fixture(scope="module")
def other_model():
    """Same architecture and tokenizer as ``tiny``, different weights."""
    return load_model(tiny_hf_model(seed=1), tiny_tokenizer())


def test_expect_another_model_names_the_weights(built, other_model, tiny):
    _, out = built
    open_cache(out, expect=tiny)  # the right model passes
    with pytest.raises(CacheError, match=r"model\.weights_sha256: cache has"):
        open_cache(out, expect=other_model)


def test_expect_another_tokenizer_or_template(built, tiny):
    _, out = built
    tok = tiny_tokenizer()
    tok.add_tokens(["<extra>"])
    with pytest.raises(CacheError, match=r"model\.tokenizer_sha256") as err:
        open_cache(out, expect=load_model(tiny.hf, tok))
    assert "weights_sha256" not in str(err.value)
    tok = tiny_tokenizer()
    tok.chat_template = tok.chat_template.replace("helpful", "harmless")
    with pytest.raises(CacheError, match=r"model\.chat_template_sha256"):
        open_cache(out, expect=load_model(tiny.hf, tok))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("layers", [0, 2]),
        ("pooling", "last_token"),
        ("max_length", 512),
        ("stats", ["grad"]),
        ("storage_dtype", "float32"),
    ],
)
def test_expect_other_fields_are_named(built, field, value):
    _, out = built
    pattern = re.escape(f"{field}: cache has ") + ".*" + re.escape(f"expected {value!r}")
    with pytest.raises(CacheError, match=pattern):
        open_cache(out, expect={field: value})


def test_expect_several_mismatches_are_all_named(built, other_model):
    _, out = built
    with pytest.raises(CacheError) as err:
        open_cache(out, expect={"model": other_model, "layers": [0], "pooling": "max"})
    msg = str(err.value)
    assert "model.weights_sha256" in msg and "layers" in msg and "pooling" in msg


def test_rank_refuses_a_query_from_another_model(built, tiny, other_model, pair_records):
    _, out = built
    cache = open_cache(out)
    good = behavior_query(tiny, pair_records, layers=[1], max_length=64)
    assert len(rank(cache, good, layer=1, top_k=3)) == 3
    bad = behavior_query(other_model, pair_records, layers=[1], max_length=64)
    with pytest.raises(CacheError, match=r"model\.weights_sha256"):
        rank(cache, bad, layer=1)
    with pytest.raises(CacheError, match=r"model\.weights_sha256"):
        rank(out, bad, layer=1)  # a path is opened and checked the same way


def test_rank_and_stat_name_a_layer_the_cache_lacks(built, tiny, pair_records):
    _, out = built
    cache = open_cache(out)
    with pytest.raises(KeyError, match=r"layer 2 is not in this cache \(it has \[1, 3\]\)"):
        cache.stat("grad", 2)
    q = behavior_query(tiny, pair_records, layers=[2], max_length=64)
    with pytest.raises(KeyError, match="layer 2"):
        rank(cache, q, layer=2)


def test_rebuilding_into_a_cache_of_something_else_is_refused(tmp_path, tiny, other_model, built):
    train, ref = built
    out = fresh_copy(ref, tmp_path / "c")
    with pytest.raises(CacheError, match=r"holds a different cache: layers"):
        build_cache(tiny, train, out=out, layers=[0], shard_size=3, batch_size=2, max_length=64)
    with pytest.raises(CacheError, match=r"model\.weights_sha256"):
        build_cache(
            other_model, train, out=out, layers=LAYERS, shard_size=3, batch_size=2, max_length=64
        )
    (out / "manifest.json").unlink()  # an unfinished build: same check against build.json
    with pytest.raises(CacheError, match=r"different, unfinished build: max_length"):
        build_cache(tiny, train, out=out, layers=LAYERS, shard_size=3, batch_size=2, max_length=128)
    left = files(out)  # the refused builds touched nothing
    assert left == {k: v for k, v in files(ref).items() if k != "manifest.json"}


# ------------------------------------------------------------ the manifest's own integrity


def edit_manifest(out: Path, edit, *, rehash: bool) -> None:  # noqa: ANN001
    """Apply ``edit`` to the manifest; ``rehash``: as a careful forger would, fix its checksum."""
    from lensattr.store.cache import write_manifest

    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    if rehash:
        write_manifest(out, manifest)
    else:
        (out / "manifest.json").write_text(json.dumps(manifest))


def _rotate(m: dict) -> None:
    m["ids"] = m["ids"][1:] + m["ids"][:1]


def test_rotated_ids_are_refused(tmp_path, built):
    # Issue 11.7: rotating manifest["ids"] by one passed verify and put the wrong id at rank 1.
    _, ref = built
    out = fresh_copy(ref, tmp_path / "c")
    edit_manifest(out, _rotate, rehash=False)
    with pytest.raises(CacheError, match=r"manifest\.json: checksum mismatch.*modified"):
        open_cache(out)
    edit_manifest(out, _rotate, rehash=True)  # the shards' headers still hold their own ids
    with pytest.raises(CacheError, match=r"shard-00000\.safetensors: holds other ids"):
        open_cache(out, verify=False)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (
            lambda m: m.update(d_model=10**12),
            r"'residual_change/1' is BF16 \[3, 32\], the manifest says BF16 \[3, 1000000000000\]",
        ),
        (lambda m: m["shards"][1].update(n_rows=10**9), "ids, rows and shards do not agree"),
        (lambda m: m.update(n_rows=10**9), "ids, rows and shards do not agree"),
        (lambda m: m.update(storage_dtype="float32"), "'residual_change/1' is BF16 .* says F32"),
        (lambda m: m.update(layers=[1, 2]), "'residual_change/2' is missing"),
        (lambda m: m["records"].update(file="../records.jsonl.gz"), "not a plain file name"),
        (lambda m: m["records"].update(size=1), "records copy missing or of the wrong size"),
    ],
)
def test_manifest_fields_that_disagree_with_the_shards_are_refused(tmp_path, built, edit, problem):
    _, ref = built
    out = fresh_copy(ref, tmp_path / "c")
    edit_manifest(out, edit, rehash=True)
    with pytest.raises(CacheError, match=problem):
        open_cache(out, verify=False)  # before any view is allocated


def test_old_schema_is_refused_with_a_clear_message(tmp_path, built):
    _, ref = built
    out = fresh_copy(ref, tmp_path / "c")
    edit_manifest(out, lambda m: m.update(schema_version=1), rehash=True)
    with pytest.raises(CacheError, match="schema version 1 .*reads 3.*rebuild"):
        open_cache(out)


@pytest.mark.parametrize(
    "name",
    ["../other/shard-00000.safetensors", "/tmp/shard-00000.safetensors", "..", ".hidden", "a/b"],
)
def test_shard_names_must_be_plain_names_inside_the_cache(tmp_path, built, name):
    # Issue 11.12: manifest shard paths were joined unchecked.
    _, ref = built
    out = fresh_copy(ref, tmp_path / "c")
    edit_manifest(out, lambda m: m["shards"][0].update(file=name), rehash=True)
    with pytest.raises(CacheError, match="is not a plain file name"):
        open_cache(out, verify=False)


def test_a_shard_symlinked_out_of_the_cache_is_refused(tmp_path, built):
    _, ref = built
    out = fresh_copy(ref, tmp_path / "c")
    elsewhere = tmp_path / "elsewhere.safetensors"
    (out / "shard-00001.safetensors").rename(elsewhere)
    (out / "shard-00001.safetensors").symlink_to(elsewhere)
    with pytest.raises(CacheError, match="symlink that leads out"):
        open_cache(out)
    (out / "shard-00001.safetensors").unlink()
    (out / "shard-00001.safetensors").symlink_to("shard-00001.safetensors.real")
    elsewhere.rename(out / "shard-00001.safetensors.real")
    assert len(open_cache(out)) == 12  # a link inside the cache directory is fine


# ------------------------------------------------------------------------ stale shards


def test_stale_shards_are_not_reused_when_build_json_is_gone(tmp_path, tiny, built, train_records):
    # Issue 11.11: with build.json gone, a changed training file reused every old shard.
    train, ref = built
    out = fresh_copy(ref, tmp_path / "c")
    (out / "manifest.json").unlink()
    (out / "build.json").unlink()
    recs = [dict(r) for r in train_records]
    recs.insert(4, {"id": "new", "prompt": "Hello there", "response": "General Kenobi"})
    recs[9] = {**recs[9], "response": "an edited reply"}
    changed = write_jsonl(tmp_path / "train.jsonl", recs)
    cache = rebuild(tiny, changed, out)
    fresh = rebuild(tiny, changed, tmp_path / "fresh")
    assert cache.ids == fresh.ids == [r["id"] for r in recs]
    for f in (tmp_path / "fresh").glob("shard-*"):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert (out / "shard-00000.json").read_bytes() == (ref / "shard-00000.json").read_bytes()


def test_encoding_is_per_chunk(tmp_path, tiny, train_records, monkeypatch):
    # Token ids of one chunk at a time, so memory stays flat in the number of examples.
    import lensattr.build as cache_mod

    sizes = []
    real = cache_mod.encode_all
    monkeypatch.setattr(
        cache_mod, "encode_all", lambda m, exs, *a: (sizes.append(len(exs)), real(m, exs, *a))[1]
    )
    build_cache(tiny, train_records, out=tmp_path / "c", layers=[1], shard_size=5)
    assert sizes == [5, 5, 2] * 2  # a first pass (nothing kept) finds a bad record before any work
    sizes.clear()
    build_cache(tiny, train_records, out=tmp_path / "d", layers=[1], shard_size=5, on_error="skip")
    assert sizes == [5, 5, 2]


def test_a_record_too_long_fails_before_any_work(tmp_path, tiny, monkeypatch):
    import lensattr.build as cache_mod

    # A short system prompt leaves room for the reply; the template's default one does not.
    recs = [{"id": f"ok{i}", "system": "s", "prompt": "Hi", "response": "Yo"} for i in range(11)]
    recs.append({"id": "cut", "prompt": "Hi", "response": "Yo"})
    monkeypatch.setattr(cache_mod, "capture", lambda *a, **k: pytest.fail("computed first"))
    with pytest.raises(DataError, match=r"record 11, field 'messages'.*'cut'"):
        build_cache(tiny, recs, out=tmp_path / "c", layers=[1], shard_size=5, max_length=30)


# ------------------------------------------------------------------------- writers


def test_a_second_writer_gets_a_clear_error(tmp_path, tiny, train_records):
    # Issue 11.14: two builds into one directory raced on fixed temporary names.
    import fcntl

    out = tmp_path / "c"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # another writer, mid-build
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(CacheError, match="another lensattr build is writing to this"):
            build_cache(tiny, train_records, out=out, layers=[1])
        with pytest.raises(CacheError, match="another lensattr build"):
            build_cache(tiny, train_records, out=out, layers=[1], rank=1, world_size=2)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing was written
    assert len(build_cache(tiny, train_records, out=out, layers=[1])) == 12


def test_two_concurrent_builds_one_wins_the_other_is_told(tmp_path, train_records):
    train = write_jsonl(tmp_path / "train.jsonl", train_records * 1)
    script = tmp_path / "build.py"
    script.write_text(BUILD_SCRIPT)
    out = tmp_path / "c"
    cmd = [sys.executable, str(script), str(train), str(out)]
    procs = [
        subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    errs = [p.communicate(timeout=300)[1].decode() for p in procs]
    codes = [p.returncode for p in procs]
    assert 0 in codes
    for code, err in zip(codes, errs, strict=True):
        assert code == 0 or "another lensattr build is writing" in err, err
    assert len(open_cache(out, verify="full")) == 12


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_respect_the_umask(tmp_path, tiny, train_records, umask):
    old = os.umask(umask)
    try:
        build_cache(tiny, train_records[:3], out=tmp_path / "c", layers=[1])
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "c").iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


# ---------------------------------------------------------------------- non-finite rows


def _scale(monkeypatch, ids: set[str], factor: float) -> None:  # noqa: ANN001
    """Multiply the captured activations of ``ids`` by ``factor`` (fp32-finite, fp16-inf)."""
    import lensattr.build

    real = lensattr.build.capture

    def scaled(model, batch, layers, **kw):  # noqa: ANN001, ANN202
        acts = real(model, batch, layers, **kw)
        for row, eid in enumerate(batch.ids):
            if eid in ids:
                for la in acts.values():
                    la.z_out[row] *= factor
        return acts

    monkeypatch.setattr(lensattr.build, "capture", scaled)


def test_float16_overflow_is_an_error_naming_the_examples(
    tmp_path, tiny, train_records, monkeypatch
):
    # Issue 11.8: the finiteness check ran on fp32, before the cast: fp16 stored inf.
    _scale(monkeypatch, {"ex3", "ex5"}, 1e9)
    kw = {"layers": [1], "stats": ["resid_post"], "storage_dtype": "fp16"}
    with pytest.raises(
        CacheError,
        match=r"example 'ex3': non-finite resid_post at layer 1 in "
        r"float16; also 'ex5' \(use on_error='skip' or storage_dtype='bfloat16'\)",
    ):
        build_cache(tiny, train_records, out=tmp_path / "a", **kw)
    cache = build_cache(tiny, train_records, out=tmp_path / "b", on_error="skip", **kw)
    assert [s["id"] for s in cache.manifest["skipped"]] == ["ex3", "ex5"]
    assert torch.isfinite(cache.stat("resid_post", 1)[:].float()).all()
    # bf16 has fp32's range: the same activations are stored, finite.
    cache = build_cache(tiny, train_records, out=tmp_path / "c", **{**kw, "storage_dtype": "bf16"})
    assert len(cache) == 12


def test_open_reports_non_finite_rows(tmp_path, tiny, train_records):
    from lensattr.store.cache import write_manifest
    from lensattr.store.shards import MappedShard, describe_shard, sha256_file, write_shard

    out = tmp_path / "c"
    build_cache(tiny, train_records, out=out, layers=[1], stats=["grad"], shard_size=6)
    shard = out / "shard-00001.safetensors"
    m = MappedShard(shard)
    tensors = {k: m[k].clone() for k in list(m.keys())}
    metadata = dict(m.metadata)
    del m
    tensors["grad/1"][2, 0] = float("inf")  # row 8 of the cache, checksums made to match
    write_shard(shard, tensors, metadata=metadata)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][1].update(sha256=sha256_file(shard), **describe_shard(shard))
    write_manifest(out, manifest)
    cache = open_cache(out)
    with pytest.raises(CacheError, match=r"'grad/1' is not finite in the rows of 'ex8'"):
        cache.stat("grad", 1)
    with pytest.raises(CacheError, match="not finite"):
        open_cache(out, verify="full")
