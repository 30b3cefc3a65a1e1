"""Training examples and behaviour pairs: records, loading and validation.

Sources are jsonl / json / csv / parquet files, hub datasets named ``hf://owner/name``,
``datasets`` objects (``Dataset``, ``IterableDataset``, ``DatasetDict`` with a split), pandas
DataFrames and iterables of dicts. jsonl and csv are parsed here line by line (not by ``datasets``)
so that an error names the line; parquet and hub datasets go through ``datasets``. Every
malformed record raises :class:`DataError` naming the file, the line (or row) and the field.
"""

import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    field: str | None = None


HUB_PREFIX = "hf://"
"""Hub datasets (and models) are named explicitly, ``hf://owner/name``; other strings are paths."""


def _rows(name: str, rows: Iterable[Any]) -> list[tuple[str, Any]]:
    return [(f"{name}, row {i}", rec) for i, rec in enumerate(rows)]


def _pick_split(source: Any, split: str | None, what: str) -> Any:
    """One split of a ``DatasetDict`` / ``IterableDatasetDict``: ``split``, or the only one."""
    names = list(source.keys())
    if split is None and len(names) == 1:
        split = names[0]
    if split not in names:
        asked = "no split given" if split is None else f"no split {split!r}"
        raise ValueError(f"{what}: {asked}; pass split= one of {', '.join(map(repr, names))}")
    return source[split]


def _jsonl(path: Path) -> list[tuple[str, Any]]:
    """Parse a jsonl file line by line; a bad line (JSON or UTF-8) becomes :class:`_Unparsable`."""
    out: list[tuple[str, Any]] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:  # a BOM is allowed at the start of the file only
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                bad = raw[err.start : err.start + 1].hex()
                problem = f"not UTF-8 text (byte 0x{bad} at column {err.start + 1})"
                out.append((f"{path}:{lineno}", _Unparsable(problem)))
                continue
            if not line.strip():
                continue
            try:
                rec: Any = json.loads(line)
            except json.JSONDecodeError as err:
                rec = _Unparsable(f"invalid JSON ({err.msg})")
            out.append((f"{path}:{lineno}", rec))
    return out


def _csv(path: Path) -> list[tuple[str, Any]]:
    """Rows of a CSV file with a header line; empty cells are missing fields; a ``messages``
    cell holds a JSON list."""
    out: list[tuple[str, Any]] = []
    with path.open("rb") as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}", None, "not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            rec: Any = {k: v for k, v in row.items() if k is not None and v not in ("", None)}
            if None in row:
                rec = _Unparsable("more cells than the header has columns")
            elif isinstance(rec.get("messages"), str):
                try:
                    rec["messages"] = json.loads(rec["messages"])
                except json.JSONDecodeError as err:
                    rec = _Unparsable(f"invalid JSON ({err.msg})", "messages")
            out.append((where, rec))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}", None, f"invalid CSV ({err})") from None
    return out


def _parquet(path: Path) -> list[Any]:
    """The rows of a parquet file (an empty or unreadable one: a :class:`DataError` naming it)."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # noqa: BLE001  (pyarrow's errors share no base class lensattr knows)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(str(path), None, f"not a readable parquet file ({first})") from None


def _raw_records(source: Any, split: str | None = None) -> tuple[str, list[tuple[str, Any]]]:
    """Return (description, [(location, record), ...]) for any supported source."""
    import datasets

    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        source = _pick_split(source, split, "DatasetDict")
    elif split is not None and not (isinstance(source, str) and source.startswith(HUB_PREFIX)):
        raise ValueError(
            f"split={split!r} applies to a DatasetDict or an hf:// dataset, not to a "
            f"{type(source).__name__}"
        )
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return "dataset", _rows("dataset", source)
    if type(source).__module__.split(".")[0] == "pandas" and hasattr(source, "to_dict"):
        if not hasattr(source, "columns"):
            raise TypeError("a pandas Series is not a table of records; pass a DataFrame")
        frame = source.astype(object).where(source.notna(), None)  # NaN cells: missing fields
        return "DataFrame", _rows("DataFrame", frame.to_dict("records"))
    if isinstance(source, str) and source.startswith(HUB_PREFIX):
        name = source[len(HUB_PREFIX) :]
        if not name:
            raise ValueError(f"{source!r}: give a hub dataset as hf://owner/name")
        ds = datasets.load_dataset(name, split=split or "train")
        return source, _rows(source, ds)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: no such file (a hub dataset is named hf://owner/name)"
            )
        if path.is_dir():
            raise ValueError(f"{path}: a directory; give a .jsonl, .json, .csv or .parquet file")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return str(path), _jsonl(path)
        if suffix == ".csv":
            return str(path), _csv(path)
        if suffix == ".json":
            raw = path.read_bytes()
            try:
                data = json.loads(raw.decode("utf-8-sig"))
            except UnicodeDecodeError as err:
                line = raw.count(b"\n", 0, err.start) + 1
                raise DataError(f"{path}:{line}", None, "not UTF-8 text") from None
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{err.lineno}", None, f"invalid JSON ({err.msg})") from None
            if isinstance(data, dict) and "pairs" in data:  # a trait spec: its pairs
                data = data["pairs"]
            if not isinstance(data, list):
                raise DataError(str(path), None, "expected a JSON array of records")
            return str(path), [(f"{path}, record {i}", rec) for i, rec in enumerate(data)]
        if suffix == ".parquet":
            return str(path), _rows(str(path), _parquet(path))
        raise ValueError(
            f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .csv or .parquet)"
        )
    if isinstance(source, Mapping):
        raise TypeError("a single record (dict) is not a source; pass a list of records")
    if isinstance(source, Iterable) and not isinstance(source, (bytes, bytearray)):
        return "records", [(f"record {i}", rec) for i, rec in enumerate(source)]
    raise TypeError(
        f"unsupported source {type(source).__name__}: give a file path, hf://owner/name, a "
        "datasets Dataset / IterableDataset / DatasetDict, a pandas DataFrame or an iterable "
        "of dicts"
    )


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
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # e.g. a lone surrogate from a JSON "\\ud800" escape
        raise DataError(where, name, f"not valid Unicode text (at character {err.start})") from None
    return value


def _record_id(rec: Mapping[str, Any], where: str, index: int) -> str:
    if "id" not in rec or rec["id"] is None:
        return f"row-{index}"
    if not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool):  # true: not "True"
        raise DataError(where, "id", f"expected a string, got {type(rec['id']).__name__}")
    return str(rec["id"])


def _parse_example(rec: Any, where: str, index: int) -> Example:
    if isinstance(rec, Example):
        return rec
    if isinstance(rec, _Unparsable):
        raise DataError(where, rec.field, rec.problem)
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
    if isinstance(rec, Pair):
        return rec
    if isinstance(rec, _Unparsable):
        raise DataError(where, rec.field, rec.problem)
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


def _load(
    source: Any,
    parse: Callable[[Any, str, int], Any],
    what: str,
    on_error: str,
    skipped: list[dict[str, str]] | None,
    split: str | None,
) -> list[Any]:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    _, raw = _raw_records(source, split)
    out: list[Any] = []
    seen: dict[str, str] = {}
    for i, (where, rec) in enumerate(raw):
        try:
            item = parse(rec, where, i)
            if item.id in seen:
                problem = f"duplicate {what} id {item.id!r} (first at {seen[item.id]})"
                raise DataError(where, "id", problem)
        except DataError as err:
            if on_error != "skip":
                raise
            rid = rec.get("id") if isinstance(rec, Mapping) else getattr(rec, "id", None)
            (skipped if skipped is not None else []).append(
                {"where": where, "id": "" if rid is None else str(rid), "reason": str(err)}
            )
            continue
        seen[item.id] = where
        out.append(item)
    return out


def load_examples(
    source: Any,
    *,
    on_error: str = "raise",
    skipped: list[dict[str, str]] | None = None,
    split: str | None = None,
) -> list[Example]:
    """Load chat examples (``messages`` list, or ``prompt`` + ``response``).

    Fields other than ``id``, ``messages``, ``prompt`` and ``response`` (``label``, ``source``,
    ...) are kept in :attr:`Example.extra`, with ``"_where"``: the record's file and line.

    Args:
        source: a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` path (a missing path is an
            error, never a hub lookup), a hub dataset as ``"hf://owner/name"``, a
            ``datasets.Dataset`` / ``IterableDataset`` / ``DatasetDict``, a ``pandas.DataFrame``,
            or a list, generator or other iterable of dicts (or of :class:`Example`). In a CSV
            file an empty cell is a missing field and a ``messages`` cell holds a JSON list.
        on_error: ``"raise"`` (default) or ``"skip"``: skip malformed records (invalid JSON,
            bytes that are not UTF-8, repeats of an id already seen) and append
            ``{"where", "id", "reason"}`` to ``skipped``.
        skipped: list receiving the skipped records when ``on_error="skip"``.
        split: the split of a ``DatasetDict`` (needed when it has several) or of a hub dataset
            (default ``"train"``).

    Raises:
        DataError: a malformed record, naming file, line (or row) and field; duplicate ids.
        FileNotFoundError: ``source`` names no file.

    Examples:
        >>> exs = load_examples([{"id": "a", "prompt": "Hi", "response": "Hello", "label": 1}])
        >>> exs[0].id, exs[0].response, exs[0].extra["label"]
        ('a', 'Hello', 1)
    """
    return _load(source, _parse_example, "example", on_error, skipped, split)


def load_pairs(
    source: Any,
    *,
    on_error: str = "raise",
    skipped: list[dict[str, str]] | None = None,
    split: str | None = None,
) -> list[Pair]:
    """Load contrastive pairs (``prompt``, ``treatment``, ``control``, optional ``system``, ``id``).

    Takes the sources :func:`load_examples` takes, and the same ``on_error`` / ``skipped`` /
    ``split``. Other fields (such as ``meta``) are ignored. A trait-spec JSON file yields its
    ``pairs``.

    Examples:
        >>> ps = load_pairs([{"prompt": "Q", "treatment": "bad", "control": "good"}])
        >>> ps[0].id, ps[0].treatment
        ('row-0', 'bad')
    """
    return _load(source, _parse_pair, "pair", on_error, skipped, split)


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
