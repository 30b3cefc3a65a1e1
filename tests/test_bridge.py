"""The TransformerLens TransformerBridge backend agrees with the nnsight capture."""

import pytest
import torch

pytest.importorskip("transformer_lens")

from lensattr import build_cache, capture, load_examples, load_model  # noqa: E402
from lensattr.backends.bridge import (  # noqa: E402
    BridgeModel,
    bridge_from_hf,
    capture_bridge,
    hf_state_dict,
    wrap_bridge,
)
from lensattr.render import collate, encode  # noqa: E402
from lensattr.testing import tiny_hf_model, tiny_tokenizer  # noqa: E402

LAYERS = [0, 2, 3]
TOL = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole tensor."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.fixture(scope="module")
def pair():
    """(nnsight model, bridge model) on two copies of the same tiny random weights."""
    ref = load_model(tiny_hf_model(attn_implementation="eager"), tiny_tokenizer())
    hf = tiny_hf_model(attn_implementation="eager")
    bridged = wrap_bridge(bridge_from_hf(hf, tiny_tokenizer(), name="tiny"))
    return ref, bridged


def batch_of(model, records, side):
    encs = [encode(model.tokenizer, ex) for ex in load_examples(records)]
    assert len({len(e.ids) for e in encs}) > 1  # different lengths: real padding
    return collate(encs, model.pad_id, side)


def test_wrap_bridge(pair):
    ref, bridged = pair
    assert isinstance(bridged, BridgeModel) and bridged.backend == "bridge"
    assert bridged.hf is bridged.bridge.original_model
    assert (bridged.n_layers, bridged.d_model) == (ref.n_layers, ref.d_model)
    assert not any(p.requires_grad for p in bridged.bridge.parameters())
    assert list(hf_state_dict(bridged.hf)) == list(ref.hf.state_dict())
    assert bridged.fingerprint()["weights_sha256"] == ref.fingerprint()["weights_sha256"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_capture_matches_nnsight(pair, train_records, side):
    ref, bridged = pair
    batch = batch_of(ref, train_records[:5], side)
    sites = ("attn_out", "mlp_out")
    want = capture(ref, batch, LAYERS, sites=sites)
    got = capture(bridged, batch, LAYERS, sites=sites)  # dispatches to capture_bridge
    for layer in LAYERS:
        for name in ("z_in", "z_out", "grad", *sites):
            a, b = getattr(got[layer], name), getattr(want[layer], name)
            assert rel(a, b) < TOL, (side, layer, name, rel(a, b))
        assert want[layer].grad[batch.mask].abs().max() > 0  # a real gradient


def test_padding_does_not_change_results(pair, train_records):
    _, bridged = pair
    right = capture(bridged, batch_of(bridged, train_records[:4], "right"), [1])[1]
    left_batch = batch_of(bridged, train_records[:4], "left")
    left = capture(bridged, left_batch, [1])[1]
    n = left_batch.attention_mask.sum(1)
    width = left_batch.input_ids.shape[1]
    for i, k in enumerate(n.tolist()):
        for name in ("z_in", "z_out", "grad"):
            a = getattr(right, name)[i, :k]
            b = getattr(left, name)[i, width - k :]
            assert rel(a, b) < TOL, (i, name)


def test_forward_only_and_logits_fallback(pair, train_records, monkeypatch):
    ref, bridged = pair
    batch = batch_of(ref, train_records[:3], "right")
    want = capture(ref, batch, [1, 2])
    fwd = capture_bridge(bridged, batch, [1, 2], grad=False)  # stops after block 2
    assert fwd[2].grad is None
    assert rel(fwd[2].z_out, want[2].z_out) < TOL and rel(fwd[1].z_in, want[1].z_in) < TOL
    monkeypatch.setattr("lensattr.backends.bridge._final_norm_hook", lambda bridge: None)
    via_logits = capture_bridge(bridged, batch, [1, 2])
    for layer in (1, 2):
        assert rel(via_logits[layer].grad, want[layer].grad) < TOL


def test_bad_arguments(pair, train_records):
    _, bridged = pair
    batch = batch_of(bridged, train_records[:2], "right")
    with pytest.raises(ValueError, match="unknown sites"):
        capture_bridge(bridged, batch, [1], sites=["resid_mid"])
    with pytest.raises(ValueError, match="out of range"):
        capture_bridge(bridged, batch, [bridged.n_layers])


def test_load_model_bridge_backend():
    model = load_model("tiny-random", backend="bridge")
    assert model.backend == "bridge" and model.name == "tiny-random"
    with pytest.raises(ValueError, match="backend"):
        load_model("tiny-random", backend="jax")


def test_build_cache_matches_nnsight(pair, train_records, tmp_path):
    ref, bridged = pair
    recs = train_records[:6]
    kw = dict(layers=[1, 3], storage_dtype="float32", batch_size=3, progress=False)
    want = build_cache(ref, recs, out=tmp_path / "nnsight", **kw)
    got = build_cache(bridged, recs, out=tmp_path / "bridge", **kw)
    assert got.ids == want.ids and got.stats == want.stats
    for stat in want.stats:
        for layer in (1, 3):
            a, b = got.stat(stat, layer)[:], want.stat(stat, layer)[:]
            assert rel(a, b) < TOL, (stat, layer, rel(a, b))
    got.check(ref)  # same weights fingerprint: a bridge cache serves nnsight queries
