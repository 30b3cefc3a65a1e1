"""Training examples and behaviour pairs: records, loading and validation.

Sources are jsonl / json / parquet files, hub dataset names, ``datasets.Dataset`` objects or plain
lists of dicts. jsonl is parsed here line by line (not by ``datasets``) so that an error names the
line; the other formats go through ``datasets``. Every malformed record raises :class:`DataError`
naming the file, the line (or row) and the field.
"""

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A malformed input record; the message names the file, line (or row) and field."""

    def __init__(self, where: str, field_name: str | None, problem: str) -> None:
        self.where, self.field, self.problem = where, field_name, problem
        loc = f"{where}, field '{field_name}'" if field_name else where
        super().__init__(f"{loc}: {problem}")


@dataclass(frozen=True)
class Example:
    """One chat example; the attributed reply is the last message, which must be the assistant's.

    Examples:
        >>> ex = Example.from_prompt("ex-1", "What is 2+2?", "4")
        >>> [m["role"] for m in ex.messages]
        ['user', 'assistant']
    """

    id: str
    messages: tuple[Mapping[str, str], ...]
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_prompt(
        cls, id: str, prompt: str, response: str, system: str | None = None
    ) -> "Example":
        msgs = [{"role": "system", "content": system}] if system is not None else []
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return cls(id=id, messages=tuple(msgs))

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class Pair:
    """A contrastive pair: same prompt, a *treatment* reply with the behaviour, a *control* without.

    ``control_system`` lets the two sides use different system prompts (persona vectors); by
    default both use ``system``.
    """

    id: str
    prompt: str
    treatment: str
    control: str
    system: str | None = None
    control_system: str | None = None

    def sides(self) -> tuple[Example, Example]:
        csys = self.control_system if self.control_system is not None else self.system
        return (
            Example.from_prompt(f"{self.id}/treatment", self.prompt, self.treatment, self.system),
            Example.from_prompt(f"{self.id}/control", self.prompt, self.control, csys),
        )


# ----------------------------------------------------------------------------- raw records


@dataclass(frozen=True)
class _Unparsable:
    """A jsonl line that is not valid JSON (an error when parsed, or skipped with the rest)."""

    problem: str


def _raw_records(source: Any) -> tuple[str, list[tuple[str, Any]]]:
    """Return (description, [(location, record), ...]) for any supported source."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a hard dependency
        datasets = None
    if datasets is not None and isinstance(source, datasets.Dataset):
        name = "dataset"
        return name, [(f"{name}, row {i}", rec) for i, rec in enumerate(source)]
    if isinstance(source, (list, tuple)):
        return "records", [(f"record {i}", rec) for i, rec in enumerate(source)]
    path = Path(source)
    if not path.exists():
        if isinstance(source, str) and "/" in source and not source.startswith((".", "/")):
            # A hub dataset name: the code path exists, but nothing downloads in tests.
            ds = datasets.load_dataset(source, split="train")
            return source, [(f"{source}, row {i}", rec) for i, rec in enumerate(ds)]
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec: Any = json.loads(line)
                except json.JSONDecodeError as err:
                    rec = _Unparsable(f"invalid JSON ({err.msg})")
                out.append((f"{path}:{lineno}", rec))
        return str(path), out
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}", None, f"invalid JSON ({err.msg})") from None
        if isinstance(data, dict) and "pairs" in data:  # a trait spec: its pairs
            data = data["pairs"]
        if not isinstance(data, list):
            raise DataError(str(path), None, "expected a JSON array of records")
        return str(path), [(f"{path}, record {i}", rec) for i, rec in enumerate(data)]
    if suffix == ".parquet":
        ds = datasets.Dataset.from_parquet(str(path))
        return str(path), [(f"{path}, row {i}", rec) for i, rec in enumerate(ds)]
    raise ValueError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")


def _string(
    rec: Mapping[str, Any], key: str, where: str, *, optional: bool = False, name: str | None = None
) -> str | None:
    name = name or key  # the field as the error names it, e.g. "messages[2].content"
    if key not in rec or rec[key] is None:
        if optional:
            return None
        raise DataError(where, name, "missing")
    value = rec[key]
    if not isinstance(value, str):
        raise DataError(where, name, f"expected a string, got {type(value).__name__}")
    return value


def _record_id(rec: Mapping[str, Any], where: str, index: int) -> str:
    if "id" not in rec or rec["id"] is None:
        return f"row-{index}"
    if not isinstance(rec["id"], (str, int)):
        raise DataError(where, "id", f"expected a string, got {type(rec['id']).__name__}")
    return str(rec["id"])


def _parse_example(rec: Any, where: str, index: int) -> Example:
    if isinstance(rec, _Unparsable):
        raise DataError(where, None, rec.problem)
    if not isinstance(rec, Mapping):
        raise DataError(where, None, f"expected a JSON object, got {type(rec).__name__}")
    rid = _record_id(rec, where, index)
    extra = {k: v for k, v in rec.items() if k not in ("id", "messages", "prompt", "response")}
    extra["_where"] = where  # so later errors (e.g. truncation) can name the file and line
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(where, "messages", "expected a non-empty list of messages")
        clean: list[dict[str, str]] = []
        for j, m in enumerate(msgs):
            if not isinstance(m, Mapping):
                raise DataError(where, f"messages[{j}]", "expected an object")
            role = _string(m, "role", where, name=f"messages[{j}].role")
            if role not in ROLES:
                raise DataError(where, f"messages[{j}].role", f"unknown role {role!r}")
            content = _string(m, "content", where, name=f"messages[{j}].content")
            assert role is not None and content is not None  # both are required fields
            clean.append({"role": role, "content": content})
        if clean[-1]["role"] != "assistant":
            raise DataError(where, "messages", "the last message must be the assistant's reply")
        if len(clean) < 2:
            raise DataError(where, "messages", "needs a prompt before the assistant's reply")
        ex = Example(id=rid, messages=tuple(clean), extra=extra)
    elif "prompt" in rec or "response" in rec:
        prompt = _string(rec, "prompt", where)
        response = _string(rec, "response", where)
        system = _string(rec, "system", where, optional=True)
        assert prompt is not None and response is not None
        ex = Example.from_prompt(rid, prompt, response, system)
        ex = Example(id=ex.id, messages=ex.messages, extra=extra)
    else:
        raise DataError(where, "messages", "missing (give 'messages' or 'prompt' + 'response')")
    if not ex.response.strip():
        raise DataError(where, "messages[-1].content" if "messages" in rec else "response", "empty")
    return ex


def _parse_pair(rec: Any, where: str, index: int) -> Pair:
    if isinstance(rec, _Unparsable):
        raise DataError(where, None, rec.problem)
    if not isinstance(rec, Mapping):
        raise DataError(where, None, f"expected a JSON object, got {type(rec).__name__}")
    values = {k: _string(rec, k, where) for k in ("prompt", "treatment", "control")}
    for k in ("treatment", "control"):
        if not values[k].strip():  # type: ignore[union-attr]
            raise DataError(where, k, "empty")
    return Pair(
        id=_record_id(rec, where, index),
        prompt=values["prompt"],  # type: ignore[arg-type]
        treatment=values["treatment"],  # type: ignore[arg-type]
        control=values["control"],  # type: ignore[arg-type]
        system=_string(rec, "system", where, optional=True),
    )


def _check_unique(ids: Iterable[tuple[str, str]], what: str) -> None:
    seen: dict[str, str] = {}
    for where, rid in ids:
        if rid in seen:
            raise DataError(where, "id", f"duplicate {what} id {rid!r} (first at {seen[rid]})")
        seen[rid] = where


def load_examples(
    source: Any, *, on_error: str = "raise", skipped: list[dict[str, str]] | None = None
) -> list[Example]:
    """Load chat examples (``messages`` list, or ``prompt`` + ``response``).

    Args:
        source: a ``.jsonl`` / ``.json`` / ``.parquet`` path, a hub dataset name, a
            ``datasets.Dataset`` or a list of dicts (or of :class:`Example`).
        on_error: ``"raise"`` (default) or ``"skip"``: skip malformed records (and repeats of
            an id already seen) and append ``{"where", "id", "reason"}`` to ``skipped``.
        skipped: list receiving the skipped records when ``on_error="skip"``.

    Raises:
        DataError: a malformed record, naming file, line (or row) and field; duplicate ids.

    Examples:
        >>> exs = load_examples([{"id": "a", "prompt": "Hi", "response": "Hello"}])
        >>> exs[0].id, exs[0].response
        ('a', 'Hello')
    """
    if isinstance(source, (list, tuple)) and source and all(isinstance(e, Example) for e in source):
        _check_unique(((f"record {i}", e.id) for i, e in enumerate(source)), "example")
        return list(source)
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    _, raw = _raw_records(source)
    out: list[Example] = []
    seen: dict[str, str] = {}
    for i, (where, rec) in enumerate(raw):
        try:
            ex = _parse_example(rec, where, i)
            if ex.id in seen:
                problem = f"duplicate example id {ex.id!r} (first at {seen[ex.id]})"
                raise DataError(where, "id", problem)
        except DataError as err:
            if on_error != "skip":
                raise
            rid = rec.get("id") if isinstance(rec, Mapping) else None
            (skipped if skipped is not None else []).append(
                {"where": where, "id": "" if rid is None else str(rid), "reason": str(err)}
            )
            continue
        seen[ex.id] = where
        out.append(ex)
    return out


def load_pairs(source: Any) -> list[Pair]:
    """Load contrastive pairs (``prompt``, ``treatment``, ``control``, optional ``system``, ``id``).

    Other fields (such as ``meta``) are ignored. A trait-spec JSON file yields its ``pairs``.

    Examples:
        >>> ps = load_pairs([{"prompt": "Q", "treatment": "bad", "control": "good"}])
        >>> ps[0].id, ps[0].treatment
        ('row-0', 'bad')
    """
    if isinstance(source, (list, tuple)) and source and all(isinstance(p, Pair) for p in source):
        return list(source)
    _, raw = _raw_records(source)
    pairs = [_parse_pair(rec, where, i) for i, (where, rec) in enumerate(raw)]
    _check_unique(((w, p.id) for (w, _), p in zip(raw, pairs, strict=True)), "pair")
    return pairs


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_fingerprint(source: Any, examples: Sequence[Example]) -> dict[str, str | None]:
    """Path (when a file) and a content hash of a training source, for the cache manifest."""
    if isinstance(source, (str, Path)) and Path(source).exists():
        return {"path": str(Path(source).resolve()), "sha256": file_sha256(source)}
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.id, list(ex.messages)], sort_keys=True).encode())
    return {"path": None, "sha256": h.hexdigest()}
