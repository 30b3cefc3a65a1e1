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

from lensattr import behavior_query, build_cache, load_model, open_cache, rank
from lensattr.cache import CacheError
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
    import lensattr.records as records
    import lensattr.store as store

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
    from lensattr.store import sha256_file

    _, out = built
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) == 4
    for info in manifest["shards"]:
        assert info["sha256"] == sha256_file(out / info["file"])


def flip_byte_in(shard: Path, key: str) -> None:
    """Flip one bit of one stored value of tensor ``key`` (the header stays intact)."""
    from lensattr.store import MappedShard

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
    q = behavior_query(tiny, pair_records, layers=[1])
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
    from lensattr.store import MappedShard

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
        ("dtype", "float32"),
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
    good = behavior_query(tiny, pair_records, layers=[1])
    assert len(rank(cache, good, layer=1, top_k=3)) == 3
    bad = behavior_query(other_model, pair_records, layers=[1])
    with pytest.raises(CacheError, match=r"model\.weights_sha256"):
        rank(cache, bad, layer=1)
    with pytest.raises(CacheError, match=r"model\.weights_sha256"):
        rank(out, bad, layer=1)  # a path is opened and checked the same way


def test_rank_and_stat_name_a_layer_the_cache_lacks(built, tiny, pair_records):
    _, out = built
    cache = open_cache(out)
    with pytest.raises(KeyError, match=r"layer 2 is not in this cache \(it has \[1, 3\]\)"):
        cache.stat("grad", 2)
    q = behavior_query(tiny, pair_records, layers=[2])
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
