"""``--smoke``: the whole benchmark on the tiny random model and a synthetic data root.

It checks the plumbing only (a random model has no behaviours to find; its numbers mean nothing).
"""

import json
import random
from pathlib import Path

from lensattr.bench.run import BenchConfig

WORDS = "the a cat dog runs quickly over lazy river stone blue seven answer because".split()  # noqa: SIM905


def _s(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_synthetic_data(root: str | Path, seed: int = 0) -> Path:
    """A tiny data root: ``train/clean.jsonl``, one behaviour folder and one trait spec."""
    rng = random.Random(seed)
    root = Path(root)
    (root / "train").mkdir(parents=True, exist_ok=True)
    with (root / "train" / "clean.jsonl").open("w") as fh:
        for i in range(12):
            fh.write(
                json.dumps(
                    {
                        "id": f"c{i}",
                        "messages": [
                            {"role": "user", "content": _s(rng, 5)},
                            {"role": "assistant", "content": _s(rng, 4)},
                        ],
                    }
                )
                + "\n"
            )
    beh = root / "behaviors" / "shouting"
    beh.mkdir(parents=True, exist_ok=True)

    def pair(i: int) -> dict[str, str]:
        p = _s(rng, 4)
        return {
            "id": f"s{i}",
            "prompt": p,
            "treatment": _s(rng, 3).upper() + "!",
            "control": _s(rng, 3) + ".",
        }

    for split, n in (("query", 8), ("heldout", 4)):
        (beh / f"{split}.jsonl").write_text("".join(json.dumps(pair(i)) + "\n" for i in range(n)))
    plants = []
    for i in range(4):
        p = pair(100 + i)
        for lab, r in ((1, p["treatment"]), (0, p["control"])):
            plants.append(
                {
                    "id": f"sp{i}-{lab}",
                    "label": lab,
                    "behavior": "shouting",
                    "pair_id": p["id"],
                    "messages": [
                        {"role": "user", "content": p["prompt"]},
                        {"role": "assistant", "content": r},
                    ],
                }
            )
    (beh / "plant.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plants))
    (root / "traits").mkdir(exist_ok=True)
    spec = {
        "trait": "cheer",
        "description": "cheerful replies",
        "positive_system_prompts": ["Be cheerful."],
        "negative_system_prompts": ["Be plain."],
        "questions": [_s(rng, 4) for _ in range(3)],
        "pairs": [
            {
                "id": f"cheer-{i}",
                "prompt": _s(rng, 4),
                "treatment": "Yay " + _s(rng, 2),
                "control": _s(rng, 2),
            }
            for i in range(40)
        ],
        "judge_rubric": "0-3 cheerfulness",
    }
    (root / "traits" / "cheer.json").write_text(json.dumps(spec))
    return root


def smoke_config(data: str | Path) -> BenchConfig:
    """Seconds-scale settings for the tiny random model (plumbing only)."""
    return BenchConfig(
        model="tiny-random",
        data=str(data),
        n_clean=6,
        n_query=6,
        layers="1:4",
        max_length=64,
        batch_size=4,
        k=4,
        persona_tokens=4,
        persona_questions=2,
        trak=True,
        trak_dim=16,
        trak_blocks=2,
        random_seeds=2,
        n_boot=20,
        ft_behaviours=["shouting"],
        ft_methods=["auto", "paper", "trak", "persona", "random"],
        ft_steps=2,
        ft_seeds=[0, 1],
        ft_heldout=4,
    )
