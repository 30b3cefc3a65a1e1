"""Copy the small demo subset of ../shared/data into lensattr/bundled (reproducible, seeded).

Run: python scripts/bundle_data.py [SHARED_DATA_DIR]
"""

import json
import random
import shutil
import sys
from pathlib import Path

SRC = Path(
    sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[1] / ".." / "shared" / "data"
)
DST = Path(__file__).parents[1] / "lensattr" / "bundled"
BEHAVIOR = "persona-psychopathy"
N_CLEAN, N_PLANT, N_QUERY = 240, 60, 64


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    plants = read(SRC / "behaviors" / BEHAVIOR / "plant.jsonl")
    pos = [p for p in plants if p["label"] == 1][: N_PLANT // 2]
    neg = [p for p in plants if p["label"] == 0][: N_PLANT // 2]
    train = clean + pos + neg
    rng.shuffle(train)
    write(DST / "demo" / "train.jsonl", train)
    write(
        DST / "demo" / "query.jsonl", read(SRC / "behaviors" / BEHAVIOR / "query.jsonl")[:N_QUERY]
    )
    (DST / "LICENSES").mkdir(parents=True, exist_ok=True)
    for name in ("self-instruct-Apache-2.0.txt", "anthropic-evals-CC-BY-4.0.txt"):
        shutil.copy(SRC / "LICENSES" / name, DST / "LICENSES" / name)
    (DST / "README.md").write_text(
        "# Bundled demo data\n\n"
        f"`demo/train.jsonl`: {N_CLEAN} examples of the clean instruction corpus "
        "(self-instruct / T0 templates, Apache-2.0) with prompt + reply at most 600 characters, "
        f"plus {N_PLANT} planted "
        f"examples of `{BEHAVIOR}` (Anthropic model-written evals, CC-BY-4.0): "
        f"{N_PLANT // 2} with label 1 (the reply shows the behaviour) and {N_PLANT // 2} "
        "decoys with "
        "label 0, shuffled (seed 0).\n\n"
        f"`demo/query.jsonl`: the first {N_QUERY} pairs of `{BEHAVIOR}/query.jsonl` (disjoint from "
        "the plants).\n\nMade by `scripts/bundle_data.py`; licences in `LICENSES/`.\n"
    )


if __name__ == "__main__":
    main()
