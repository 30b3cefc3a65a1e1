"""Extending lensattr through its public registries only: a toy backend (``register_backend``),
a toy choice criterion (``register_criterion``) and a toy statistic and query rule
(``register_stat``, ``register_query``), each checked against an independent computation."""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import lensattr
from lensattr.backends.backend import BACKENDS, Model, register_backend
from lensattr.registry import CRITERION, QUERY, STAT
from lensattr.types import LayerActs


@dataclass
class HiddenStatesModel(Model):
    """A forward-only backend: the residual stream from ``output_hidden_states`` (block ``l``'s
    input is ``hidden_states[l]``, its output ``hidden_states[l + 1]`` below the last block)."""

    @classmethod
    def from_hf(cls, name: str, hf: Any, tokenizer: Any) -> "HiddenStatesModel":
        return cls(name=name, hf=hf, tokenizer=tokenizer)

    @classmethod
    def from_native(
        cls, obj: Any, tokenizer: Any, device: Any = None, dtype: Any = None
    ) -> "HiddenStatesModel":
        return cls(name="toy-native", hf=obj.hf, tokenizer=tokenizer or obj.tokenizer)

    def capture(
        self, batch: Any, layers: Sequence[int], *, grad: bool = True, **options: Any
    ) -> dict[int, LayerActs]:
        if grad:
            raise ValueError("this toy backend is forward-only")
        with torch.no_grad():
            out = self.hf(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                output_hidden_states=True,
            )
        hs = out.hidden_states
        return {
            la: LayerActs(z_in=hs[la], z_out=hs[la + 1], grad=None, mask=batch.mask)
            for la in layers
        }


@dataclass
class ToyNative:
    """A model object of the toy backend's 'own library'."""

    hf: Any
    tokenizer: Any


@pytest.fixture
def toy_backend() -> Iterator[str]:
    register_backend("toy", HiddenStatesModel, lambda obj: isinstance(obj, ToyNative))
    try:
        yield "toy"
    finally:
        BACKENDS.pop("toy", None)


def test_a_toy_backend_caches_what_nnsight_caches(toy_backend, tiny, train_records, tmp_path):
    toy = lensattr.load_model("tiny-random", backend=toy_backend)
    assert isinstance(toy, HiddenStatesModel) and toy.backend == "toy"
    assert toy.fingerprint()["weights_sha256"] == tiny.fingerprint()["weights_sha256"]
    kw = dict(layers=[1, 2], stats=["resid_post"], storage_dtype="float32", progress=False)
    got = lensattr.build_cache(toy, train_records[:6], out=tmp_path / "toy", **kw)
    want = lensattr.build_cache(tiny, train_records[:6], out=tmp_path / "nnsight", **kw)
    for layer in (1, 2):
        a, b = got.stat("resid_post", layer)[:], want.stat("resid_post", layer)[:]
        assert torch.allclose(a, b, atol=1e-5), (layer, (a - b).abs().max())
    # a model object the backend's detect recognises goes to it whatever backend= says
    native = lensattr.load_model(ToyNative(tiny.hf, tiny.tokenizer))
    assert isinstance(native, HiddenStatesModel) and native.name == "toy-native"


def test_backend_registry_errors(toy_backend):
    with pytest.raises(ValueError, match=r"backend must be one of \['bridge', 'nnsight', 'toy'\]"):
        lensattr.load_model("tiny-random", backend="jax")
    with pytest.raises(ValueError, match="already registered"):
        register_backend("nnsight", HiddenStatesModel)
    with pytest.raises(TypeError, match="cls"):  # (beartype's message under the tests, or ours)
        register_backend("plain", dict)  # type: ignore[arg-type]


@pytest.fixture
def toy_criterion() -> Iterator[str]:
    @lensattr.register_criterion("toy_accuracy", description="held-out accuracy alone")
    def toy_accuracy(fs: Any) -> float:
        return fs.accuracy()

    try:
        yield "toy_accuracy"
    finally:
        CRITERION.pop("toy_accuracy", None)


def test_select_chooses_by_a_registered_criterion(toy_criterion, tiny, train_records, tmp_path):
    cache = lensattr.build_cache(tiny, train_records, out=tmp_path, layers=[1, 3], progress=False)
    pairs = [
        {"prompt": f"Q{i}", "treatment": "Yes, always " * (i % 3 + 1), "control": f"No {i}."}
        for i in range(8)
    ]
    ps = lensattr.pair_stats(tiny, pairs, stats=cache.stats, layers=[1, 3], progress=False)
    sel = lensattr.select(tiny, cache, ps, criterion=toy_criterion, set_size=1)
    assert sel.criterion == toy_criterion and "held-out accuracy alone" in sel.summary()
    assert all(r["criterion"] == r["accuracy"] for r in sel.table)
    # select's two stages, computed here: best mean accuracy over layers, then its best layer
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in sel.table:
        by_method.setdefault(r["method"], []).append(r)
    mean = {m: sum(r["accuracy"] for r in rows) / len(rows) for m, rows in by_method.items()}
    best = max(mean.values())
    assert mean[str(sel.method)] == best
    rows = by_method[str(sel.method)]
    assert sel.layer == max(rows, key=lambda r: (r["accuracy"], r["accuracy"], r["layer"]))["layer"]
    with pytest.raises(KeyError, match="unknown criterion 'nope'; registered: .*toy_accuracy"):
        lensattr.select(tiny, cache, ps, criterion="nope")


def test_a_statistic_and_a_query_rule_join_by_name(tiny, train_records, pair_records, tmp_path):
    @lensattr.register_stat("toy_last_input", needs_grad=False)
    def toy_last_input(acts: LayerActs) -> torch.Tensor:
        last = acts.mask.int().cumsum(1).argmax(1)  # the last reply position
        return acts.z_in[torch.arange(len(last)), last]

    @lensattr.register_query("toy_treatment", stat="toy_last_input", stats=("toy_last_input",))
    def toy_treatment(treatment: torch.Tensor, control: torch.Tensor, pool: Any) -> torch.Tensor:
        return treatment

    try:
        cache = lensattr.build_cache(
            tiny, train_records, out=tmp_path, layers=[2], stats=["toy_last_input"], progress=False
        )
        assert lensattr.Method("toy_treatment", "toy_last_input", "dot") in lensattr.candidates(
            cache.stats
        )
        q = lensattr.behavior_query(tiny, pair_records, query="toy_treatment", layers=[2])
        assert (q.rule, q.stat, q.score) == ("toy_treatment", "toy_last_input", "cosine")
        q.save(tmp_path / "q.safetensors")
        assert lensattr.Query.load(tmp_path / "q.safetensors").rule == "toy_treatment"
        # independent: the mean of the treatment replies' rows, normalised, is the query
        ps = lensattr.pair_stats(tiny, pair_records, stats=["toy_last_input"], layers=[2])
        t = ps.sides("toy_last_input", 2)[0].double().mean(0)
        assert torch.allclose(q.vector(2), (t / t.norm()).float(), atol=1e-6)
    finally:
        STAT.pop("toy_last_input", None)
        QUERY.pop("toy_treatment", None)
