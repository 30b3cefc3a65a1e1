"""Security: no pickle anywhere in lensattr, ``trust_remote_code`` off by default, and secrets
(judge API keys, hub tokens) only ever come from the environment and never reach logs, manifests
or results.

The source checks walk the syntax tree of every module of the package, so they also hold new code
to the same rules.
"""

import ast
import gzip
import json
import logging
import pickle
import re
from pathlib import Path

import pytest
import torch

import lensattr
from lensattr.cli import build_parser, main

PACKAGE = Path(lensattr.__file__).parent
SOURCES = sorted(p for p in PACKAGE.rglob("*.py"))
PICKLING_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
}
SECRET_NAME = re.compile(
    r"^(api_?key|.*_api_key|secret|.*_secret|password|token|hf_token|access_token|auth_token|"
    r"credentials?)$",
    re.IGNORECASE,
)
SENTINEL = "sk-SENTINEL-do-not-leak-7f3a9c"


def _trees() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(encoding="utf-8"), filename=str(p))) for p in SOURCES]


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', '?')}"


def _dotted(node: ast.AST) -> str:
    """``torch.load`` for ``torch.load``; ``""`` for anything that is not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def _kw_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
        for k in call.keywords
    )


def test_sources_are_found():
    names = {p.name for p in SOURCES}
    assert {"cache.py", "shards.py", "models.py", "query.py", "distributed.py"} <= names


def test_no_pickle_imports_or_calls():
    problems = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [(node.module or "").split(".")[0]]
                if node.module == "torch" and {a.name for a in node.names} & {"load", "save"}:
                    problems.append(f"{_where(path, node)}: `from torch import load/save`")
            else:
                mods = []
            problems += [
                f"{_where(path, node)}: imports {m}" for m in mods if m in PICKLING_MODULES
            ]
            if isinstance(node, ast.Attribute) and "pickle" in node.attr.lower():
                problems.append(f"{_where(path, node)}: .{node.attr}")
    assert not problems, "pickle in lensattr:\n" + "\n".join(problems)


def test_torch_load_is_weights_only_and_torch_save_unused():
    problems = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            if name == "torch.load" and not _kw_is(node, "weights_only", True):
                problems.append(f"{_where(path, node)}: torch.load without weights_only=True")
            if name == "torch.save":
                problems.append(
                    f"{_where(path, node)}: torch.save writes a pickle (use safetensors)"
                )
            if _kw_is(node, "allow_pickle", True):
                problems.append(f"{_where(path, node)}: allow_pickle=True")
            if _kw_is(node, "safe_serialization", False):
                problems.append(f"{_where(path, node)}: safe_serialization=False")
    assert not problems, "\n".join(problems)


def test_trust_remote_code_is_never_hard_wired_on():
    problems = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _kw_is(node, "trust_remote_code", True):
                problems.append(f"{_where(path, node)}: trust_remote_code=True")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults))
                defaults += node.args.defaults + node.args.kw_defaults
                for a, d in zip(args, defaults, strict=True):
                    if (
                        a.arg == "trust_remote_code"
                        and isinstance(d, ast.Constant)
                        and d.value is not False
                    ):
                        problems.append(
                            f"{_where(path, node)}: {node.name}(trust_remote_code={d.value})"
                        )
    assert not problems, "\n".join(problems)


def test_trust_remote_code_is_off_unless_asked(monkeypatch):
    import inspect

    import transformers

    from lensattr.backends.models import load_model
    from lensattr.testing import tiny_hf_model, tiny_tokenizer

    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    seen: list[tuple[str, object]] = []

    def fake_model(path, **kw):  # noqa: ANN001, ANN202
        seen.append(("model", kw.get("trust_remote_code")))
        return tiny_hf_model()

    def fake_tok(path, **kw):  # noqa: ANN001, ANN202
        seen.append(("tokenizer", kw.get("trust_remote_code")))
        return tiny_tokenizer()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tok)
    load_model("hf://someone/some-model", device="cpu")
    assert seen == [("model", False), ("tokenizer", False)]
    seen.clear()
    load_model("hf://someone/some-model", device="cpu", trust_remote_code=True)
    assert seen == [("model", True), ("tokenizer", True)]


def test_cli_trust_remote_code_defaults_off():
    parser = build_parser()
    for argv in (
        ["cache", "--train", "t.jsonl", "--out", "c"],
        ["query", "--pairs", "p.jsonl", "--out", "q.safetensors"],
    ):
        assert parser.parse_args(argv).trust_remote_code is False
        assert parser.parse_args([*argv, "--trust-remote-code"]).trust_remote_code is True


def test_files_written_are_safetensors_or_json(tmp_path, tiny, train_records, pair_records):
    from lensattr import behavior_query, build_cache

    cache = build_cache(tiny, train_records, out=tmp_path / "c", layers=[1], shard_size=5)
    behavior_query(tiny, pair_records, layers=[1]).save(tmp_path / "q.safetensors")
    for f in tmp_path.rglob("*"):
        if f.is_file():
            # .lock: an empty file for flock; records.jsonl.gz: gzip-compressed JSON lines
            assert f.suffix in (".json", ".safetensors") or f.name in (".lock", "records.jsonl.gz")
            if f.suffix == ".safetensors":  # the safetensors layout: u64 header size, JSON header
                raw = f.read_bytes()
                n = int.from_bytes(raw[:8], "little")
                assert raw[8:9] == b"{" and raw[8 + n - 1 : 8 + n].rstrip() in (b"}", b"")
            elif f.name == ".lock":
                assert f.stat().st_size == 0
            elif f.suffix == ".gz":
                lines = gzip.decompress(f.read_bytes()).decode("ascii").splitlines()
                assert [json.loads(line)["id"] for line in lines] == cache.ids
    assert len(cache) == len(train_records)


def test_pipeline_runs_with_pickle_and_torch_load_disabled(
    tmp_path, tiny, train_records, pair_records, monkeypatch
):
    """Nothing lensattr does on its main path unpickles or pickles anything."""
    from lensattr import behavior_query, build_cache, open_cache, rank
    from lensattr.query import Query

    def forbidden(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("lensattr used pickle")

    for name in ("load", "loads", "dump", "dumps"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch, "save", forbidden)
    build_cache(tiny, train_records, out=tmp_path / "c", layers=[1, 2], shard_size=5)
    cache = open_cache(tmp_path / "c", expect=tiny)
    behavior_query(tiny, pair_records, layers=[1, 2]).save(tmp_path / "q.safetensors")
    q = Query.load(tmp_path / "q.safetensors")
    assert len(rank(cache, q, layer=2, top_k=3)) == 3


# ------------------------------------------------------------------------------------ secrets


def test_no_secret_is_a_cli_option():
    parser = build_parser()
    subparsers = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    options = {s for a in parser._actions for s in a.option_strings}
    for sp in subparsers:
        for p in sp.choices.values():
            options |= {s for a in p._actions for s in a.option_strings}
    bad = [o for o in options if SECRET_NAME.match(o.lstrip("-").replace("-", "_"))]
    assert not bad, f"secrets must come from the environment, not the command line: {bad}"


def test_no_function_takes_a_secret_as_a_parameter():
    problems = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                for arg in a.posonlyargs + a.args + a.kwonlyargs:
                    if SECRET_NAME.match(arg.arg):
                        problems.append(f"{_where(path, node)}: {node.name}({arg.arg}=...)")
    assert not problems, "secrets must be read from the environment:\n" + "\n".join(problems)


def test_api_keys_are_read_from_the_environment_only():
    """A module that names an API key variable reads it through ``os.environ`` / ``os.getenv``."""
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        if re.search(r"[A-Z_]*API_KEY", text):
            assert "os.environ" in text or "os.getenv" in text, path


@pytest.fixture
def secrets_in_env(monkeypatch):
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "LENSATTR_JUDGE_API_KEY", "JUDGE_API_KEY"):
        monkeypatch.setenv(var, SENTINEL)
    return SENTINEL


def test_secrets_never_reach_logs_manifests_or_results(
    tmp_path, train_records, pair_records, secrets_in_env, caplog, capsys
):
    import json

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in train_records))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_records))
    common = ["--model", "tiny-random", "--device", "cpu", "--layers", "1,2", "--quiet"]
    caplog.set_level(logging.DEBUG)
    assert (
        main(
            [
                "-v",
                "cache",
                *common,
                "--train",
                str(train),
                "--out",
                str(tmp_path / "c"),
                "--shard-size",
                "5",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "-v",
                "query",
                *common,
                "--pairs",
                str(pairs),
                "--out",
                str(tmp_path / "q.safetensors"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "-v",
                "rank",
                "--cache",
                str(tmp_path / "c"),
                "--query",
                str(tmp_path / "q.safetensors"),
                "--layer",
                "2",
                "--top-k",
                "3",
                "--out",
                str(tmp_path / "r.jsonl"),
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    written = b"".join(f.read_bytes() for f in tmp_path.rglob("*") if f.is_file())
    assert (tmp_path / "c" / "manifest.json").exists() and (tmp_path / "r.jsonl").exists()
    assert secrets_in_env.encode() not in written
    assert secrets_in_env not in out.out + out.err
    assert secrets_in_env not in caplog.text
