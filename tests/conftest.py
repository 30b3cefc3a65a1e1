"""Shared fixtures: a tiny random Llama with a byte-level ChatML tokenizer (seconds on a CPU)."""

import os
import random

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
# The tiny model's matmuls are too small to gain from threads; on a loaded machine a second
# thread made a capture ~7x slower. The real-model tests raise this again.
torch.set_num_threads(1)

WORDS = "the a cat dog runs quickly over lazy river stone blue seven answer because".split()  # noqa: SIM905


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="session")
def tiny():
    """The tiny model (4 blocks, d_model 32, eager attention, fp32)."""
    from lensattr import load_model

    return load_model("tiny-random")


@pytest.fixture(scope="session")
def train_records():
    """12 chat examples of varied prompt and reply lengths (one with a system prompt)."""
    rng = random.Random(0)
    recs = [
        {"id": f"ex{i}", "prompt": sentence(rng, 2, 30), "response": sentence(rng, 1, 12)}
        for i in range(11)
    ]
    recs.append(
        {
            "id": "ex-sys",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
            ],
        }
    )
    return recs


@pytest.fixture(scope="session")
def pair_records():
    rng = random.Random(1)
    return [
        {
            "id": f"p{i}",
            "prompt": sentence(rng, 3, 10),
            "treatment": "Yes! " + sentence(rng, 1, 5),
            "control": "No. " + sentence(rng, 1, 5),
        }
        for i in range(6)
    ]
