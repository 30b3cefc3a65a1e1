"""The chunked head loss against the dense one (logits of every predicting position at once)."""

import pytest
import torch
import torch.nn.functional as F
from reference import reference_capture

from lensattr import capture, load_examples
from lensattr.backends import loss as loss_mod
from lensattr.backends.loss import ChunkedHeadNLL, response_loss
from lensattr.render import collate, encode


def dense_nll(hidden, targets, weight, bias, cap):
    """Independent of lensattr: full logits, soft cap, log-softmax, gather."""
    logits = (hidden @ weight.T + (0 if bias is None else bias)).float()
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return -F.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]


@pytest.mark.parametrize(("cap", "with_bias"), [(None, False), (30.0, True)])
def test_chunked_head_matches_dense(monkeypatch, cap, with_bias):
    monkeypatch.setattr(loss_mod, "HEAD_CHUNK", 3)  # 11 positions: chunks of 3, 3, 3, 2
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 8, generator=gen, requires_grad=True)
    weight = torch.randn(20, 8, generator=gen)
    bias = torch.randn(20, generator=gen) if with_bias else None
    targets = torch.randint(0, 20, (11,), generator=gen)
    scale = torch.rand(11, generator=gen)  # any downstream weighting of the positions

    got = ChunkedHeadNLL.apply(hidden, targets, (weight, bias, cap))
    (g_got,) = torch.autograd.grad((got * scale).sum(), hidden)
    want = dense_nll(hidden, targets, weight, bias, cap)
    (g_want,) = torch.autograd.grad((want * scale).sum(), hidden)

    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(g_got, g_want, atol=1e-6)
    assert g_want.abs().min() > 0  # every row has a gradient to compare
    with torch.no_grad():  # no gradient wanted: the values alone
        assert torch.allclose(ChunkedHeadNLL.apply(hidden, targets, (weight, bias, cap)), want)


def test_trainable_head_keeps_its_gradient(tiny, train_records):
    """A head that trains (not a capture's) takes the dense path: its weight gets its gradient."""
    encs = [encode(tiny.tokenizer, ex) for ex in load_examples(train_records[:3])]
    batch = collate(encs, tiny.pad_id, "right")
    head = tiny.hf.get_output_embeddings()
    with torch.no_grad():
        hidden = tiny.hf.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
    head.weight.requires_grad_(True)
    try:
        loss, _ = response_loss(hidden, tiny, batch.input_ids, batch.mask)
        (got,) = torch.autograd.grad(loss, head.weight)
    finally:
        head.weight.requires_grad_(False)
    weight = head.weight.detach().clone().requires_grad_(True)
    want_loss = sum(  # sum over examples of the mean NLL of each one's response tokens
        dense_nll(hidden[b, pos - 1], batch.input_ids[b, pos], weight, None, None).mean()
        for b in range(len(encs))
        for pos in [batch.mask[b].nonzero()[:, 0]]
    )
    (want,) = torch.autograd.grad(want_loss, weight)
    assert torch.allclose(loss, want_loss) and want.abs().max() > 0
    assert torch.allclose(got, want, atol=1e-6)


def test_capture_with_small_chunks_matches_reference(tiny, train_records, monkeypatch):
    """A capture whose head runs in many chunks still matches hooks + autograd on full logits."""
    monkeypatch.setattr(loss_mod, "HEAD_CHUNK", 2)
    batch = collate(
        [encode(tiny.tokenizer, ex) for ex in load_examples(train_records[:5])],
        tiny.pad_id,
        "right",
    )
    assert int(batch.mask.sum()) > 4 * 2  # several chunks
    acts = capture(tiny, batch, [0, 3], keep_prompt=False)
    ref = reference_capture(
        tiny.hf, batch.input_ids, batch.attention_mask, batch.position_ids, batch.mask, [0, 3]
    )
    for layer in (0, 3):
        g = ref[layer][2][batch.mask]  # response positions in order, each row's cut or not
        assert g.abs().max() > 0
        got = acts[layer].grad[acts[layer].mask]
        assert ((got - g).norm(dim=-1) / g.norm(dim=-1).clamp(min=1e-30)).max() < 1e-5


def test_capture_recomputes_silu_outputs_bitwise(tiny, train_records, monkeypatch):
    """A gradient capture's graph keeps no SiLU output (one recomputed per block from the
    lowest requested layer up), and its tensors are bitwise those of a capture that keeps them."""
    import contextlib

    from lensattr.backends import nnsight as capture_mod

    batch = collate(
        [encode(tiny.tokenizer, ex) for ex in load_examples(train_records[:5])],
        tiny.pad_id,
        "right",
    )
    counts = []
    real = capture_mod.silu_recomputed

    @contextlib.contextmanager
    def spy(module):
        with real(module) as count:
            yield count
        counts.append(count["recomputed"])

    monkeypatch.setattr(capture_mod, "silu_recomputed", spy)
    got = capture(tiny, batch, [1, 3], keep_prompt=False)
    assert counts == [3]  # blocks 1, 2, 3: the graph is cut below block 1
    monkeypatch.setattr(capture_mod, "silu_recomputed", lambda module: contextlib.nullcontext())
    want = capture(tiny, batch, [1, 3], keep_prompt=False)
    for layer in (1, 3):
        assert torch.equal(got[layer].grad, want[layer].grad)
        assert torch.equal(got[layer].z_out, want[layer].z_out)
        assert want[layer].grad.abs().max() > 0
