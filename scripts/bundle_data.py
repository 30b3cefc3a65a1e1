"""Copy the small demo subset of ../shared/data into lensattr/bundled (reproducible, seeded).

Run: python scripts/bundle_data.py [SHARED_DATA_DIR]
"""

import json
import random
import re
import shutil
import sys
from pathlib import Path

SRC = Path(
    sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[1] / ".." / "shared" / "data"
)
DST = Path(__file__).parents[1] / "lensattr" / "bundled"
TRAIT = "empathy"
N_CLEAN = 240  # the trait's 40 pairs split 16 / 12 / 12: query / plant / heldout (as the bench)


# Special-token text (``<|endoftext|>``, ``<|im_end|>``, ``</s>``) inside a reply: a corpus
# artifact the plants would not share, which a ranking could pick up instead of the behaviour.
SPECIAL = re.compile(r"<\|[^|<>\s]*\|>|</?s>")


def read(path: Path) -> list[dict]:
    """The records of a jsonl file; refuses special-token text in any reply (file, line, field)."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        replies = [(f"messages[{i}].content", m["content"]) for i, m in
                   enumerate(rec.get("messages", [])) if m["role"] == "assistant"]  # fmt: skip
        replies += [(k, rec[k]) for k in ("treatment", "control", "response") if k in rec]
        for field, text in replies:
            found = SPECIAL.search(text)
            if found:
                raise SystemExit(
                    f"{path}:{n}: field {field} holds special-token text {found.group()!r}; "
                    "clean the source first"
                )
        out.append(rec)
    return out


def write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def main() -> None:
    rng = random.Random(0)
    clean = [
        r
        for r in read(SRC / "train" / "clean.jsonl")
        if sum(len(m["content"]) for m in r["messages"]) <= 600
    ]
    clean = rng.sample(clean, N_CLEAN)
    spec = json.loads((SRC / "traits" / f"{TRAIT}.json").read_text())
    for i, p in enumerate(spec["pairs"]):
        for side in ("treatment", "control"):
            if SPECIAL.search(p[side]):
                raise SystemExit(f"{TRAIT}.json: pairs[{i}].{side} holds special-token text")
    query, planted, heldout = spec["pairs"][:16], spec["pairs"][16:28], spec["pairs"][28:]
    plants = [
        {
            "id": f"{p['id']}-{tag}",
            "messages": [
                {"role": "user", "content": p["prompt"]},
                {"role": "assistant", "content": p[side]},
            ],
            "label": label,
            "behavior": TRAIT,
            "pair_id": p["id"],
        }
        for p in planted
        for tag, side, label in (("treatment", "treatment", 1), ("control", "control", 0))
    ]
    train = clean + plants
    rng.shuffle(train)
    write(DST / "demo" / "train.jsonl", train)
    keys = ("id", "prompt", "treatment", "control")
    for name, split in (("query", query), ("heldout", heldout)):
        write(DST / "demo" / f"{name}.jsonl", [{k: p[k] for k in keys} for p in split])
    (DST / "LICENSES").mkdir(parents=True, exist_ok=True)
    for old in (DST / "LICENSES").iterdir():
        old.unlink()
    shutil.copy(SRC / "LICENSES" / "self-instruct-Apache-2.0.txt", DST / "LICENSES")
    shutil.copy("/usr/share/common-licenses/CC0-1.0", DST / "LICENSES" / "traits-CC0-1.0.txt")
    n = len(planted)
    (DST / "README.md").write_text(
        "# Bundled demo data\n\n"
        f"`demo/train.jsonl`: {N_CLEAN} examples of the clean instruction corpus "
        "(self-instruct / T0 templates, Apache-2.0; prompt + reply at most 600 characters) and "
        f"{2 * n} planted examples from the `{TRAIT}` trait spec (written for this project, "
        f"CC0-1.0): for each of {n} of its pairs, the treatment reply (label 1, shows the "
        "trait) and the control reply (label 0, a decoy with the same prompt), shuffled "
        "(seed 0).\n\n"
        f"`demo/query.jsonl` and `demo/heldout.jsonl`: the trait's first {len(query)} and last "
        f"{len(heldout)} pairs; the plants come from the {n} in between (the benchmark's "
        "16 / 12 / 12 split).\n\n"
        "Made by `scripts/bundle_data.py` from `../shared/data`; licences in `LICENSES/`.\n"
    )


if __name__ == "__main__":
    main()
