"""Data-parallel builds: ``torchrun`` with 2 CPU processes (gloo) equals a single-process build,
bit for bit; each rank writes a disjoint, deterministic slice of the shards; rank 0 merges.

The launched processes and the single-process reference all run with one thread, so that the
numbers are reproducible bit for bit across processes.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lensattr import build_cache, open_cache
from lensattr import distributed as dist_helpers
from lensattr.store.cache import CacheError

LAUNCH_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "TORCHELASTIC_RUN_ID",
)

# `lensattr cache ...` through the CLI's own entry point, recording which shards this rank wrote.
CLI_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    import lensattr.store.cache
    import lensattr.distributed
    from lensattr.cli import main

    log, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ.get("RANK", 0))
    written, group = [], []
    real = lensattr.store.cache.write_shard

    def spy(path, tensors, **kw):
        written.append(Path(path).name)
        group.append(lensattr.distributed.is_initialized())
        return real(path, tensors, **kw)

    lensattr.store.cache.write_shard = spy
    code = main(argv)
    (log / f"rank-{rank}.json").write_text(json.dumps({
        "code": code, "written": written,
        "group_during_build": all(group),
        "initialized_after": lensattr.distributed.is_initialized(),
    }))
    sys.exit(code)
    """
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    return env


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory, train_records):
    path = tmp_path_factory.mktemp("dist") / "train.jsonl"
    recs = [{**r, "id": f"{r['id']}-{k}"} for k, r in enumerate(train_records * 2)]  # 24
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_torchrun_two_gloo_processes_equal_a_single_process_build(tmp_path, train_file):
    script = tmp_path / "cli.py"
    script.write_text(CLI_SCRIPT)
    logs_multi, logs_single = tmp_path / "logs-multi", tmp_path / "logs-single"
    logs_multi.mkdir()
    logs_single.mkdir()
    args = [
        "cache",
        "--model",
        "tiny-random",
        "--device",
        "cpu",
        "--train",
        str(train_file),
        "--layers",
        "1,3",
        "--shard-size",
        "4",
        "--batch-size",
        "3",
        "--max-length",
        "96",
        "--quiet",
    ]
    multi, single = tmp_path / "multi", tmp_path / "single"
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(logs_multi),
    ]
    run = subprocess.run(
        [*launch, *args, "--out", str(multi)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    run = subprocess.run(
        [sys.executable, str(script), str(logs_single), *args, "--out", str(single)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    # Bitwise: every shard, sidecar, build.json and the merged manifest.
    a, b = _files(multi), _files(single)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], f"{name} differs from the single-process build"
    cache = open_cache(multi)
    assert len(cache) == 24 and len(cache.manifest["shards"]) == 6

    # Each rank wrote its own round-robin slice; the slices are disjoint and cover every shard.
    r0 = json.loads((logs_multi / "rank-0.json").read_text())
    r1 = json.loads((logs_multi / "rank-1.json").read_text())
    assert r0["code"] == r1["code"] == 0 and r0["group_during_build"] and r1["group_during_build"]
    assert r0["written"] == [f"shard-{i:05d}.safetensors" for i in (0, 2, 4)]
    assert r1["written"] == [f"shard-{i:05d}.safetensors" for i in (1, 3, 5)]
    assert not r0["initialized_after"] and not r1["initialized_after"]  # the CLI cleans up
    single_log = json.loads((logs_single / "rank-0.json").read_text())
    assert len(single_log["written"]) == 6 and not single_log["group_during_build"]


# ------------------------------------------------- ranks by hand (no launcher, no process group)


def _build(model, train, out, **kw):  # noqa: ANN001, ANN202
    return build_cache(
        model,
        train,
        out=out,
        layers=[1],
        stats=["grad"],
        shard_size=3,
        batch_size=3,
        max_length=64,
        **kw,
    )


def test_ranks_by_hand_then_merge_equal_a_single_build(tmp_path, tiny, train_records, monkeypatch):
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    ref = _build(tiny, train_records, tmp_path / "ref")
    assert ref is not None
    out = tmp_path / "by-hand"
    # Rank 0 alone cannot merge: it names the missing shard and how to finish.
    with pytest.raises(CacheError, match=r"shard-00001\.json is missing.*rerun the same build"):
        _build(tiny, train_records, out, rank=0, world_size=2)
    assert sorted(p.name for p in out.glob("shard-*.safetensors")) == [
        f"shard-{i:05d}.safetensors" for i in (0, 2)
    ]
    assert _build(tiny, train_records, out, rank=1, world_size=2) is None  # not rank 0: no cache
    merged = _build(tiny, train_records, out, rank=0, world_size=2)  # now all shards exist
    assert merged is not None and merged.ids == ref.ids
    a, b = _files(out), _files(tmp_path / "ref")
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)


def test_a_single_process_rerun_finishes_a_multi_process_build(
    tmp_path, tiny, train_records, monkeypatch
):
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    out = tmp_path / "c"
    assert _build(tiny, train_records, out, rank=2, world_size=3) is None
    cache = _build(tiny, train_records, out)  # world_size 1: does the rest, writes the manifest
    assert cache is not None and len(cache) == len(train_records)


def test_rank_and_world_size_are_validated(tmp_path, tiny):
    with pytest.raises(ValueError, match="rank 2 is not a rank of world_size 2"):
        build_cache(tiny, [{"prompt": "a", "response": "b"}], out=tmp_path, rank=2, world_size=2)


# ------------------------------------------------------------------------ the helpers


def test_world_from_env(monkeypatch):
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    assert dist_helpers.world_from_env() == (0, 1)
    assert dist_helpers.world() == (0, 1)
    assert dist_helpers.barrier() is False  # nothing to synchronise with
    assert dist_helpers.init_process_group() == (0, 1) and not dist_helpers.is_initialized()
    assert dist_helpers.default_device() is None
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_helpers.world_from_env() == (3, 4) and dist_helpers.local_rank() == 1
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4 is not a rank of WORLD_SIZE=4"):
        dist_helpers.world_from_env()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="RANK='one' is not an integer"):
        dist_helpers.world_from_env()


def test_a_multi_process_environment_without_a_launcher_is_a_clear_error(monkeypatch, tmp_path):
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR, MASTER_PORT is not set.*torchrun"):
        dist_helpers.init_process_group()
    assert dist_helpers.barrier() is False
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):  # build_cache fails before any work
        build_cache("tiny-random", [{"prompt": "a", "response": "b"}], out=tmp_path / "c")
    assert not (tmp_path / "c").exists()
