"""load_model: the user's model is left as it was, lazy nnsight models, compute dtypes, and hub
ids only in the explicit ``hf://`` form (issue 11 item 13, issue 12 items 6-7)."""

import time

import pytest
import torch
import transformers

from lensattr import load_model
from lensattr.backends.capture import capture
from lensattr.backends.models import DTYPES, parse_dtype
from lensattr.data import Example
from lensattr.render import collate, encode
from lensattr.testing import tiny_hf_model, tiny_tokenizer


def batch_for(model):  # noqa: ANN001, ANN201
    exs = [Example.from_prompt("a", "Hi there", "Yo"), Example.from_prompt("b", "Q", "Reply")]
    return collate([encode(model.tokenizer, e) for e in exs], model.pad_id)


def test_users_model_is_left_as_it_was(tiny):
    hf = tiny_hf_model().train()  # the same weights as tiny-random, as a user holds them
    hf.model.layers[0].mlp.requires_grad_(False)  # a user's own mix of flags
    flags = {n: p.requires_grad for n, p in hf.named_parameters()}
    modes = {n: m.training for n, m in hf.named_modules()}
    model = load_model(hf, tiny_tokenizer())
    acts = capture(model, batch_for(model), [1, 3])
    assert {n: p.requires_grad for n, p in hf.named_parameters()} == flags
    assert {n: m.training for n, m in hf.named_modules()} == modes
    assert all(p.grad is None for p in hf.parameters())  # the capture left no parameter grads
    want = capture(tiny, batch_for(tiny), [1, 3])  # lensattr's own, frozen copy
    for layer in (1, 3):
        assert acts[layer].grad is not None and want[layer].grad is not None
        torch.testing.assert_close(acts[layer].grad, want[layer].grad)
        torch.testing.assert_close(acts[layer].z_out, want[layer].z_out)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [("TransformersModel", {"task": "text-generation"}), ("LanguageModel", {})],
)
def test_lazy_nnsight_model_is_dispatched(cls, kwargs, tmp_path, tiny):
    import warnings

    import nnsight

    tiny_hf_model().save_pretrained(tmp_path)
    with warnings.catch_warnings():  # nnsight 0.8 calls LanguageModel its deprecated alias
        warnings.simplefilter("ignore")
        lazy = getattr(nnsight, cls)(str(tmp_path), tokenizer=tiny_tokenizer(), **kwargs)
    assert lazy.dispatched is False
    model = load_model(lazy)
    assert not any(p.is_meta for p in model.hf.parameters())
    assert model.fingerprint()["weights_sha256"] == tiny.fingerprint()["weights_sha256"]
    acts = capture(model, batch_for(model), [2])  # used to fail: Cannot copy out of meta tensor
    torch.testing.assert_close(acts[2].grad, capture(tiny, batch_for(tiny), [2])[2].grad)


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("float32", torch.float32),
        ("fp16", torch.float16),
        ("torch.float64", torch.float64),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_compute_dtype_takes_names_and_torch_dtypes(given, want):
    assert parse_dtype(given) == want
    assert load_model("tiny-random", device="cpu", compute_dtype=given).dtype == want


def test_bad_dtypes_are_one_line_errors():
    with pytest.raises(ValueError, match="compute_dtype 'bf17' is not a dtype; use one of bf16"):
        load_model("tiny-random", compute_dtype="bf17")
    with pytest.raises(TypeError, match="unexpected keyword"):
        load_model("tiny-random", dtype=torch.float32)
    assert "bf16" in DTYPES


def test_wrong_name_or_missing_path_is_a_quick_one_line_error(monkeypatch, tmp_path):
    def no_hub(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_hub)
    monkeypatch.chdir(tmp_path)
    for spec in ("models/nope", "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2"):
        start = time.monotonic()
        with pytest.raises(FileNotFoundError) as err:
            load_model(spec)
        assert time.monotonic() - start < 1
        assert str(err.value) == (
            f"{spec}: no such model directory; give a local model directory, "
            "'smollm2-135m-instruct', 'tiny-random' or a hub id as hf://owner/name"
        )
    (tmp_path / "empty").mkdir()
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"^.*empty: cannot load a causal LM from it \(") as e:
        load_model(str(tmp_path / "empty"))
    assert "\n" not in str(e.value)


def test_hub_models_need_the_explicit_form(monkeypatch):
    asked = []

    def fake(name, **kw):  # noqa: ANN001, ANN003, ANN202
        asked.append(name)
        return tiny_hf_model() if len(asked) == 1 else tiny_tokenizer()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)
    model = load_model("hf://owner/name", device="cpu")
    assert asked == ["owner/name", "owner/name"] and model.name == "hf://owner/name"
    assert not any(p.requires_grad for p in model.hf.parameters())  # lensattr's own: frozen


def test_local_directory_loads(tmp_path, tiny):
    tiny_hf_model().save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    model = load_model(tmp_path / "m", device="cpu", compute_dtype="float32")
    assert model.fingerprint()["weights_sha256"] == tiny.fingerprint()["weights_sha256"]


def test_a_bare_model_has_no_backend(tiny):
    """``Model`` is the interface; a backend is a registered subclass, so a bare ``Model`` built
    by hand is refused with the fix, by ``load_model`` and by ``capture``."""
    from lensattr import Model

    bare = Model(name="mine", hf=tiny.hf, tokenizer=tiny.tokenizer)
    with pytest.raises(NotImplementedError, match="load_model"):
        capture(bare, batch_for(tiny), [1])
    with pytest.raises(TypeError, match="a bare Model has no backend"):
        load_model(bare)
    assert load_model(tiny) is tiny
