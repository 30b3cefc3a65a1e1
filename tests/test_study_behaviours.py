"""The study's own behaviours (benchmarks/behaviors, built by scripts/build_xstest.py) are
well-formed: every split loads, the splits share no prompt, plants are half treatment and half
control of their pairs, and the licence file sits beside them."""

import json
from pathlib import Path

import pytest

from lensattr.bench.behaviors import load_behaviour
from lensattr.data import load_pairs

OWN = Path(__file__).resolve().parents[1] / "benchmarks" / "behaviors"
FOLDERS = sorted(p for p in OWN.glob("*") if (p / "plant.jsonl").exists())


def test_the_licence_travels_with_the_data():
    assert FOLDERS and (OWN / "LICENSE-XSTest-CC-BY-4.0.txt").read_text().startswith(
        "Attribution 4.0 International"
    )


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_splits_are_disjoint_and_plants_are_their_pairs_sides(folder):
    b = load_behaviour(folder)
    pairs = {
        p.id: p for split in ("query", "heldout") for p in load_pairs(folder / f"{split}.jsonl")
    }
    plants = [json.loads(x) for x in (folder / "plant.jsonl").read_text().splitlines()]
    prompts = {
        "query": {p.prompt for p in b.query},
        "heldout": {p.prompt for p in b.heldout},
        "plant": {r["messages"][0]["content"] for r in plants},
    }
    assert not prompts["query"] & prompts["heldout"]
    assert not (prompts["query"] | prompts["heldout"]) & prompts["plant"]
    assert not {r["pair_id"] for r in plants} & set(pairs)
    assert abs(sum(b.labels) - len(b.labels) / 2) <= 0.5
    assert len(b.query) >= 24 and all(p.treatment != p.control for p in b.query)
