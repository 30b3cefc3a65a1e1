"""Capture and statistics against an independent computation (hooks + autograd)."""

import contextlib

import pytest
import torch
from reference import reference_capture, reference_stats

from lensattr import build_cache, capture, load_examples
from lensattr.data import Example
from lensattr.registry import get_stat
from lensattr.render import collate, encode

REPLY_STATS = (
    "residual_change_reply",
    "residual_change_printed",
    "residual_change_diagonal",
    "resid_post",
    "grad",
)
"""The built-ins that read the reply positions only (a capture may cut each row's prompt)."""
STATS = ("residual_change", *REPLY_STATS)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over rows of ||a - b|| / ||b||."""
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp(min=1e-30)).max())


def encoded(tiny, records, max_length=None):
    return [encode(tiny.tokenizer, ex, max_length) for ex in load_examples(records)]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_capture_matches_hooks_and_autograd(tiny, train_records, padding_side):
    batch = collate(encoded(tiny, train_records[:5]), tiny.pad_id, padding_side)
    layers = [0, 2, 3]
    acts = capture(tiny, batch, layers)
    ref = reference_capture(
        tiny.hf, batch.input_ids, batch.attention_mask, batch.position_ids, batch.mask, layers
    )
    for layer in layers:
        zi, zo, g = ref[layer]
        m = batch.mask
        assert torch.allclose(acts[layer].z_in[m], zi[m], atol=1e-6)
        assert torch.allclose(acts[layer].z_out[m], zo[m], atol=1e-6)
        assert rel(acts[layer].grad[m], g[m]) < 1e-5
        assert g[m].abs().max() > 0  # a real gradient, not an empty comparison


def test_statistics_match_definitions_before_and_after_storage(tiny, train_records, tmp_path):
    recs = train_records[:6]
    layers = [1, 3]
    batch = collate(encoded(tiny, recs), tiny.pad_id)
    ref = reference_capture(
        tiny.hf, batch.input_ids, batch.attention_mask, batch.position_ids, batch.mask, layers
    )
    acts = capture(tiny, batch, layers)
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 8e-3)):
        cache = build_cache(
            tiny,
            recs,
            out=tmp_path / dtype,
            layers=layers,
            stats=STATS,
            storage_dtype=dtype,
            batch_size=2,
            progress=False,
        )
        order = [cache.ids.index(i) for i in batch.ids]
        for layer in layers:
            want = reference_stats(*ref[layer], batch.mask)
            for stat in STATS:
                fp32 = get_stat(stat).fn(acts[layer])
                assert rel(fp32, want[stat]) < 1e-5, (stat, layer)
                stored = cache.stat(stat, layer)[order].float()
                assert rel(stored, want[stat]) < tol, (stat, layer, dtype)
                norms = cache.stat(stat, layer).norms[order]
                assert torch.allclose(norms, stored.norm(dim=1), rtol=1e-5)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_example_alone_equals_batched(tiny, train_records, padding_side):
    encs = encoded(tiny, train_records)
    lengths = [len(e.ids) for e in encs]
    target = sorted(range(len(encs)), key=lambda i: lengths[i])[len(encs) // 2]  # a middle one
    longer = max(range(len(encs)), key=lambda i: lengths[i])
    shorter = min(range(len(encs)), key=lambda i: lengths[i])
    layers = [0, 3]
    alone = capture(tiny, collate([encs[target]], tiny.pad_id, padding_side), layers)
    mixed = capture(
        tiny,
        collate([encs[longer], encs[target], encs[shorter]], tiny.pad_id, padding_side),
        layers,
    )
    for layer in layers:
        for stat in STATS:
            fn = get_stat(stat).fn
            a, b = fn(alone[layer])[0], fn(mixed[layer])[1]
            assert float((a - b).norm() / a.norm()) < 1e-5, (stat, layer)


def test_all_layer_pass_equals_single_layer_passes(tiny, train_records):
    batch = collate(encoded(tiny, train_records[:4]), tiny.pad_id)
    together = capture(tiny, batch, list(range(4)))
    for layer in range(4):
        single = capture(tiny, batch, [layer])[layer]
        for stat in STATS:
            fn = get_stat(stat).fn
            assert rel(fn(together[layer]), fn(single)) < 1e-5, (stat, layer)


def test_extra_sites_sum_to_the_residual_update(tiny, train_records):
    batch = collate(encoded(tiny, train_records[:3]), tiny.pad_id)
    acts = capture(tiny, batch, [2], sites=["attn_out", "mlp_out"])[2]
    update = acts.attn_out + acts.mlp_out  # Llama block: z_out = z_in + attn_out + mlp_out
    assert torch.allclose(acts.z_in + update, acts.z_out, atol=1e-5)


def test_forward_only_capture_has_no_grad(tiny, train_records):
    batch = collate(encoded(tiny, train_records[:2]), tiny.pad_id)
    acts = capture(tiny, batch, [1], grad=False)[1]
    assert acts.grad is None
    with pytest.raises(ValueError, match="needs gradients"):
        get_stat("grad").fn(acts)


def test_sites_map_to_the_modules_that_hooks_see(tiny, train_records):
    """``locate`` puts each TransformerLens name on the module a plain torch hook reads."""
    from lensattr.backends.sites import locate, module_paths

    batch = collate(encoded(tiny, train_records[:2]), tiny.pad_id)
    paths = module_paths(tiny.hf)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for kind in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
        port = locate(f"blocks.1.hook_{kind}", paths=paths)
        module = tiny.hf.get_submodule(port.module)

        def hook(mod, args, out, kind=kind, port=port):
            x = args[0] if port.port == "input" else out
            seen[kind] = (x[0] if isinstance(x, tuple) else x).detach()

        handles.append(module.register_forward_hook(hook))
    try:
        acts = capture(tiny, batch, [1], grad=False, sites=["attn_out", "mlp_out"])[1]
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(seen["resid_pre"], acts.z_in)
    assert torch.equal(seen["resid_post"], acts.z_out)
    assert torch.equal(seen["attn_out"], acts.attn_out)
    assert torch.equal(seen["mlp_out"], acts.mlp_out)
    with pytest.raises(ValueError, match="unknown sites"):
        capture(tiny, batch, [1], sites=["resid_mid"])
    with pytest.raises(ValueError, match="unsupported site"):
        locate("blocks.1.hook_resid_mid", paths=paths)


def test_transformerlens_hook_names_are_accepted(tiny):
    from lensattr.backends.sites import site_kind
    from lensattr.layers import layer_index

    batch = collate(
        [encode(tiny.tokenizer, Example.from_prompt("a", "Hi there", "Yo"))], tiny.pad_id
    )
    short = capture(tiny, batch, [2], grad=False, sites=["mlp_out", "attn_out"])[2]
    hooked = capture(tiny, batch, [2], grad=False, sites=["hook_mlp_out", "hook_attn_out"])[2]
    assert hooked.mlp_out is not None and hooked.attn_out is not None
    assert torch.equal(hooked.mlp_out, short.mlp_out) and torch.equal(
        hooked.attn_out, short.attn_out
    )
    assert site_kind("blocks.7.hook_mlp_out") == "mlp_out"
    with pytest.raises(ValueError, match="unknown sites"):
        capture(tiny, batch, [2], sites=["hook_resid_post"])  # always captured, not an extra
    with pytest.raises(ValueError, match="unknown site 'hook_resid_mid'"):
        site_kind("hook_resid_mid")
    n = tiny.n_layers
    assert [layer_index(s, n) for s in (0, "3", -1, "-4", "blocks.2.hook_resid_post")] == [
        0,
        3,
        n - 1,
        0,
        2,
    ]
    for bad in (4, "-5", "blocks.9.hook_resid_post", "twelve", True):
        with pytest.raises(ValueError, match="layer .* (is out of range|is not a block index)"):
            layer_index(bad, n)


def test_layer_acts_rows_and_map_keep_every_field_together(tiny, train_records):
    """``rows`` / ``map`` act on every tensor, extras included; the record is one type."""
    import importlib

    import lensattr
    from lensattr.types import LayerActs

    module = importlib.import_module(
        "lensattr.backends.capture"
    )  # lensattr.backends.capture is the function
    assert lensattr.LayerActs is module.LayerActs is LayerActs
    batch = collate(encoded(tiny, train_records[:4]), tiny.pad_id)
    acts = capture(tiny, batch, [1], sites=["mlp_out"])[1]
    assert set(acts.extra) == {"mlp_out"} and acts.attn_out is None
    odd = acts.rows(slice(1, None, 2))
    for name in ("z_in", "z_out", "grad", "mask", "mlp_out"):
        assert torch.equal(getattr(odd, name), getattr(acts, name)[1::2])
    assert odd.attn_out is None
    picked = acts.rows(torch.tensor([False, True, True, False]))
    assert torch.equal(picked.z_out, acts.z_out[1:3]) and torch.equal(picked.mask, acts.mask[1:3])
    one = acts.rows(slice(0, 1))
    mask = torch.zeros((3, *one.mask.shape[1:]), dtype=torch.bool)
    wide = one.map(lambda x: x.expand(3, *x.shape[1:]), mask=mask)
    assert wide.grad is not None and wide.grad.shape[0] == 3 and wide.mask is mask
    assert torch.equal(wide.mlp_out[2], acts.mlp_out[0])


@pytest.mark.parametrize("backend", ["nnsight", "bridge"])
def test_forward_only_capture_stops_after_the_highest_layer(tiny, train_records, backend):
    """A forward-only capture runs no block above the highest requested layer, nor the final
    norm or the head (issue 14), and its rows are bitwise those of a full forward."""
    from lensattr import load_model

    m = tiny if backend == "nnsight" else load_model("tiny-random", backend="bridge")
    batch = collate(encoded(m, train_records[:5]), m.pad_id)
    top = m.n_layers - 1
    ran: list[str] = []
    handles = [
        mod.register_forward_hook(lambda *_, name=name: ran.append(name))
        for name, mod in [
            *((f"block {i}", b) for i, b in enumerate(m.hf.model.layers)),
            ("norm", m.hf.model.norm),
            ("head", m.hf.lm_head),
        ]
    ]
    try:
        early = capture(m, batch, [0, 1], grad=False)
        assert ran == ["block 0", "block 1"], ran  # the highest block finishes, hooks included
        ran.clear()
        full = capture(m, batch, [0, 1, top], grad=False)  # every block runs
        assert {f"block {i}" for i in range(top)} <= set(ran), ran
        with_grad = capture(m, batch, [0, 1])  # the full forward, then the backward
    finally:
        for h in handles:
            h.remove()
    for layer in (0, 1):
        for other in (full, with_grad):
            assert torch.equal(early[layer].z_in, other[layer].z_in)
            assert torch.equal(early[layer].z_out, other[layer].z_out)
    assert early[1].z_out.abs().max() > 0


@pytest.mark.parametrize("call", [0, 16, 10**6])  # a call per prompt length / the default / one
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_capture_after_the_prompt_prefix_matches_hooks_and_autograd(
    tiny, train_records, padding_side, call, monkeypatch
):
    """``keep_prompt=False`` runs each row's positions before its first predicting one
    forward-only and returns the rest: every response position's ``z_in``, ``z_out`` and ``g``
    are those of a one-pass hooks + autograd computation, and so are the statistics, however the
    prompts are grouped into calls (gaps between the shared opening and each prompt's rest)."""
    from lensattr.backends import prefix

    monkeypatch.setattr(prefix, "CALL_POSITIONS", call)
    batch = collate(encoded(tiny, train_records), tiny.pad_id, padding_side)
    n_real = batch.attention_mask.sum(1)
    cuts = prefix.prompt_cuts(batch, per_row=True)
    common = prefix.prompt_cuts(batch, per_row=False)
    assert cuts is not None and common == [min(cuts)] * len(cuts) and min(cuts) > 0
    assert len(set(cuts)) > 2  # rows cut at their own prompt's end: the test is not vacuous
    layers = [0, 2, 3]
    acts = capture(tiny, batch, layers, keep_prompt=False)
    ref = reference_capture(
        tiny.hf, batch.input_ids, batch.attention_mask, batch.position_ids, batch.mask, layers
    )
    m = batch.mask
    for layer in layers:
        a = acts[layer]
        assert a.z_in.shape[1] == a.grad.shape[1] == int(max(n_real - torch.tensor(cuts)))
        assert a.z_in.shape[1] < m.shape[1] - min(cuts)  # less than one cut for every row
        assert torch.equal(a.mask.sum(1), m.sum(1)) and not a.mask[:, 0].any()
        zi, zo, g = ref[layer]
        assert rel(a.z_in[a.mask], zi[m]) < 1e-5
        assert rel(a.z_out[a.mask], zo[m]) < 1e-5
        assert rel(a.grad[a.mask], g[m]) < 1e-5 and g[m].abs().max() > 0
        want = reference_stats(zi, zo, g, m)
        for stat in REPLY_STATS:
            assert rel(get_stat(stat).fn(a), want[stat]) < 1e-5, (stat, layer)
    whole = capture(tiny, batch, layers)  # the default keeps every position
    assert whole[0].z_in.shape[1] == m.shape[1]
    fwd = capture(tiny, batch, layers, grad=False, keep_prompt=False)  # forward-only: one cut
    for layer in layers:
        zi, zo, _ = ref[layer]
        assert fwd[layer].grad is None
        assert fwd[layer].z_in.shape[1] == int(n_real.max()) - min(cuts)
        assert rel(fwd[layer].z_in[fwd[layer].mask], zi[m]) < 1e-5
        assert rel(fwd[layer].z_out[fwd[layer].mask], zo[m]) < 1e-5


def test_prompt_cuts_and_call_groups():
    """No cut when a row has no reply (or nothing precedes it); the calls are the cheapest
    partition, checked against every partition of a few lengths."""
    import itertools

    from lensattr.backends.prefix import call_groups, prompt_cuts
    from lensattr.render import Encoded

    def batch(*shapes):
        return collate([Encoded(f"e{i}", tuple(range(1, n + 1)), p) for i, (n, p) in
                        enumerate(shapes)], 0, "left")  # fmt: skip

    assert prompt_cuts(batch((5, 3), (3, 3)), per_row=True) is None  # the second has no reply
    assert prompt_cuts(batch((5, 1), (3, 1)), per_row=True) is None  # nothing before a reply
    assert prompt_cuts(batch((5, 3), (3, 1)), per_row=True) == [2, 0]
    assert prompt_cuts(batch((9, 6), (4, 3)), per_row=False) == [2, 2]

    def cost(groups, lengths, call):
        return sum(call + len(g) * max(lengths[i] for i in g) for g in groups)

    def partitions(items):
        if not items:
            yield []
            return
        for rest in partitions(items[1:]):
            for i in range(len(rest)):
                yield rest[:i] + [[items[0], *rest[i]]] + rest[i + 1 :]
            yield [[items[0]], *rest]

    for lengths in ([50, 3, 48, 5], [7, 7, 7], [1, 30, 2, 29, 15], [4]):
        for call in (0, 5, 16, 1000):
            got = call_groups(lengths, call)
            assert sorted(itertools.chain(*got)) == list(range(len(lengths)))
            best = min(cost(p, lengths, call) for p in partitions(list(range(len(lengths)))))
            assert cost(got, lengths, call) == best, (lengths, call)


def test_a_statistic_that_reads_the_prompt_is_captured_whole(tiny, train_records, tmp_path):
    """Statistics pooled over the response let ``build_cache`` skip the prompt's backward; one
    with another pooling gets every position, and its cached rows match a one-pass reference."""
    from lensattr.registry import STAT, register_stat

    @register_stat("prompt_grad", pooling="first_token")
    def prompt_grad(acts):  # g at the first token, a prompt token with right padding
        return acts.grad[:, 0]

    recs = train_records[:4]
    try:
        assert STAT["prompt_grad"].reads_prompt and not STAT["grad"].reads_prompt
        cache = build_cache(tiny, recs, out=tmp_path / "c", layers=[1], stats=["prompt_grad"])
        batch = collate(encoded(tiny, recs), tiny.pad_id)
        ref = reference_capture(
            tiny.hf, batch.input_ids, batch.attention_mask, batch.position_ids, batch.mask, [1]
        )
        want = ref[1][2][:, 0]
        got = cache.stat("prompt_grad", 1)[[cache.ids.index(i) for i in batch.ids]].float()
        assert want.norm(dim=1).min() > 0 and rel(got, want) < 1e-2  # bf16 storage
    finally:
        STAT.pop("prompt_grad", None)


def test_a_pairs_replies_share_one_prefix_pass(tiny, pair_records):
    """``pair_stats`` batches a pair's two replies together; their shared prompt prefix runs
    forward once per pair, the leading positions all pairs share (the template's opening) once
    for the batch, and each side's statistics equal a whole capture of that side."""
    from lensattr import pair_stats
    from lensattr.backends.prefix import prompt_cuts
    from lensattr.data import load_pairs

    pairs = load_pairs(pair_records[:3])
    sides = [encode(tiny.tokenizer, ex, None) for p in pairs for ex in p.sides()]
    prefix_rows: list[int] = []

    def count(mod, args, kwargs):
        if not torch.is_grad_enabled():  # the prefix pass is the only one without a graph
            prefix_rows.append(tuple(kwargs["input_ids"].shape))

    handle = tiny.hf.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        got = pair_stats(
            tiny, pair_records[:3], stats=list(REPLY_STATS), layers=[1, 3], batch_size=6
        )
    finally:
        handle.remove()
    (one, shared), *calls = prefix_rows  # the batch's shared opening, then the 3 prompts
    assert one == 1 and shared > 0 and sum(rows for rows, _ in calls) == 3  # 6 replies
    batch = collate(sides, tiny.pad_id)
    assert shared + max(width for _, width in calls) == max(prompt_cuts(batch, per_row=True))
    assert len({s.ids[:shared] for s in sides}) == 1 < len({s.ids[: shared + 1] for s in sides})
    whole = capture(tiny, batch, [1, 3])  # every position, one pass
    for layer in (1, 3):
        for stat in REPLY_STATS:
            want = get_stat(stat).fn(whole[layer])
            t, c = got.sides(stat, layer)
            assert rel(t, want[0::2]) < 1e-5 and rel(c, want[1::2]) < 1e-5, (stat, layer)


def test_pairs_are_batched_by_reply_length_and_each_keeps_its_own_rows(tiny, pair_records):
    """With each row's backward starting at its own prompt's end, ``pair_stats`` batches pairs of
    similar reply length (a batch's graph is its rows x its longest reply, as in a build), and
    every pair's statistics stay those of a capture of that pair alone."""
    from lensattr import pair_stats
    from lensattr.data import load_pairs

    assert tiny.cuts_prompt
    pairs = load_pairs(pair_records)
    reply = [
        max(len(e.ids) - e.n_prompt for e in (encode(tiny.tokenizer, ex, None) for ex in p.sides()))
        for p in pairs
    ]
    widths: list[int] = []

    def graph(mod, args, kwargs):
        if torch.is_grad_enabled():  # the traced pass: each row's continuation
            widths.append(int(kwargs["input_ids"].shape[1]))

    handle = tiny.hf.model.register_forward_pre_hook(graph, with_kwargs=True)
    try:
        got = pair_stats(tiny, pair_records, stats=list(REPLY_STATS), layers=[1, 3], batch_size=4)
    finally:
        handle.remove()
    by_reply = sorted(reply, reverse=True)
    assert widths == [by_reply[i] + 1 for i in range(0, len(pairs), 2)]  # + the cut position
    for k, rec in enumerate(pair_records):
        alone = pair_stats(tiny, [rec], stats=list(REPLY_STATS), layers=[1, 3], batch_size=2)
        for layer in (1, 3):
            for stat in REPLY_STATS:
                for side in (0, 1):
                    a = got.sides(stat, layer)[side][k : k + 1]
                    assert rel(a, alone.sides(stat, layer)[side]) < 1e-5, (k, stat, layer)


def test_a_build_runs_the_shared_opening_once(tiny, train_records, tmp_path):
    """Inside one build the opening every prompt shares (the template's system prompt) runs in
    the first batch only; later batches continue from its kept keys and values, and the rows
    equal those of a build that runs it in every batch."""
    from lensattr.backends import prefix

    openings: list[tuple[int, ...]] = []

    def count(mod, args, kwargs):
        if not torch.is_grad_enabled() and int(kwargs["position_ids"][0, 0]) == 0:
            openings.append(tuple(kwargs["input_ids"].shape))

    recs = train_records[:6]
    handle = tiny.hf.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        kept = build_cache(tiny, recs, out=tmp_path / "kept", layers=[1, 3], batch_size=2,
                           stats=REPLY_STATS, storage_dtype="float32", progress=False)  # fmt: skip
        assert len(openings) == 1 and openings[0][0] == 1, openings  # 3 batches, 1 opening
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(prefix, "openings_kept", contextlib.nullcontext)
            mp.setattr("lensattr.build.openings_kept", contextlib.nullcontext)
            again = build_cache(tiny, recs, out=tmp_path / "again", layers=[1, 3],
                                batch_size=2, stats=REPLY_STATS, storage_dtype="float32",
                                progress=False)  # fmt: skip
    finally:
        handle.remove()
    assert len(openings) == 4  # without keeping it: one per batch
    for stat in REPLY_STATS:
        for layer in (1, 3):
            assert torch.equal(kept.stat(stat, layer)[:], again.stat(stat, layer)[:]), (stat, layer)


def test_reply_batches_hold_the_smallest_graphs():
    """``length_batches(..., by_reply=True)`` (gradient builds that cut each row at its own
    prompt's end) sorts by reply length: its batches' graphs, rows x (longest reply + 1) as the
    capture lays them out, never add up to more than the plain length batches' would."""
    import random

    from lensattr.backends.prefix import prompt_cuts
    from lensattr.render import Encoded, length_batches

    def graph(items):
        batch = collate(items, 0)
        cuts = prompt_cuts(batch, per_row=True)
        return len(items) * int((batch.attention_mask.sum(1) - torch.tensor(cuts)).max())

    rng = random.Random(0)
    for _ in range(100):
        items = []
        for i in range(rng.randint(1, 20)):
            n_prompt, n_reply = rng.randint(2, 30), rng.randint(1, 30)
            items.append(Encoded(f"e{i}", tuple(range(1, n_prompt + n_reply + 1)), n_prompt))
        plain, by_reply = length_batches(items, 4), length_batches(items, 4, by_reply=True)
        replies = [items[i].n_response for b in by_reply for i in b]
        assert sorted(i for b in by_reply for i in b) == list(range(len(items)))
        assert replies == sorted(replies, reverse=True)
        for b in by_reply:
            longest = max(items[i].n_response for i in b)
            assert graph([items[i] for i in b]) == len(b) * (longest + 1)
        total = sum(graph([items[i] for i in b]) for b in by_reply)
        assert total <= sum(graph([items[i] for i in b]) for b in plain)
