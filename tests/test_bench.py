"""The benchmark: a smoke run on the tiny model (plumbing only) and independent checks."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lensattr
from lensattr.backends.loss import response_loss
from lensattr.baselines import LEXICAL, lexical_scores
from lensattr.bench.behaviors import load_behaviour
from lensattr.bench.finetune import lora_finetune, trait_score
from lensattr.bench.smoke import smoke_config, write_synthetic_data
from lensattr.bench.trak import Projector, default_targets, per_example_grads
from lensattr.data import Example, load_pairs
from lensattr.methods import centered_cosine, whitened_cosine
from lensattr.render import collate, encode


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_synthetic_data(tmp_path_factory.mktemp("bench") / "data")


def ranked_at(out, behaviour, method, layers):
    """Pool metrics of ``method`` ranked by the mean of its scores at ``layers``, recomputed
    from the bench's saved cache and pairs (the pool: the clean rows and the behaviour's)."""
    cache = lensattr.open_cache(out / "cache")
    owner = json.loads((out / "pool-labels.json").read_text())
    idx = [k for k, i in enumerate(cache.ids) if owner[i][0] in ("clean", behaviour)]
    labels = torch.tensor([owner[cache.ids[k]][1] for k in idx])
    m = lensattr.Method.parse(method)
    ps = lensattr.PairStats.load(out / "pairs" / f"{behaviour}.safetensors")
    q = lensattr.behavior_query(None, ps, query=m.query, stat=m.stat, score=m.score, pool=cache)
    r = lensattr.rank(cache, q, layer=list(layers), rows=idx, top_k=None)
    return lensattr.pool_metrics(r.scores_of(idx), labels, coding="planted")


def test_smoke_run_writes_every_output(tiny, data_root, tmp_path):
    from lensattr.bench import run_bench

    cfg = smoke_config(data_root)
    cfg.ft_seeds = [0]
    out = tmp_path / "out"
    res = run_bench(cfg, out, model=tiny)
    for f in ("results.json", "results.md", "precision.png", "finetune.png", "cost.json"):
        assert (out / f).exists(), f
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["ranking"]) == {"shouting", "cheer"}
    shout = saved["ranking"]["shouting"]
    assert shout["n_clean"] == 6 and shout["n_plants"] == {"1": 4, "0": 4}
    lexical = {f"lexical {k}" for k in LEXICAL}
    # no system prompts: no persona
    assert set(shout["baselines"]) == {"trak", "random", "lexical", "repsim", *lexical}
    base = shout["baselines"]
    # the lexical row is the kind its criterion table ranks first, scored as that kind alone
    crit = {row["kind"]: row["criterion"] for row in base["lexical"]["table"]}
    assert crit[base["lexical"]["kind"]] == max(crit.values())
    chosen = base[f"lexical {base['lexical']['kind']}"]
    assert base["lexical"]["p_at_k"] == chosen["p_at_k"] and base["lexical"]["ap"] == chosen["ap"]
    # each kind recomputed from the pool file's replies and the behaviour's first query pairs
    replies = {ex.id: ex.response for ex in lensattr.load_examples(out / "pool.jsonl")}
    cache = lensattr.open_cache(out / "cache")
    owner = json.loads((out / "pool-labels.json").read_text())
    rows = [i for i in cache.ids if owner[i][0] in ("clean", "shouting")]
    pairs = load_pairs(data_root / "behaviors" / "shouting" / "query.jsonl")[: cfg.n_query]
    for k in LEXICAL:
        s = lexical_scores(
            [replies[i] for i in rows], [p.treatment for p in pairs], [p.control for p in pairs], k
        )
        got = lensattr.pool_metrics(s, torch.tensor([owner[i][1] for i in rows]), coding="planted")
        assert base[f"lexical {k}"]["p_at_k"] == got["p_at_k"], k
    # RepSim: the layer auto's criterion chooses for it alone, its P@k at every layer
    repsim = base["repsim"]
    assert repsim["method"] == "repsim|resid_post|cosine" and len(repsim["layers"]) == 3
    at = [repsim["layer"]] if isinstance(repsim["layer"], int) else repsim["layer"]
    cell = ranked_at(out, "shouting", repsim["method"], at)
    assert repsim["p_at_k"] == pytest.approx(cell["p_at_k"])
    md = (out / "results.md").read_text()
    assert "## Text search and RepSim" in md and f"({base['lexical']['kind']})" in md
    assert "persona" in saved["ranking"]["cheer"]["baselines"]
    paper = shout["grid"]["residual_change|residual_change|cosine"]
    assert len(paper["layers"]) == 3 and shout["paper"]["layer"] == paper["query_layer"]
    # auto's metrics: the mean standardised score of its members, each at its own layer,
    # recomputed from the bench's saved cache and pairs
    auto = shout["auto"]
    cache = lensattr.open_cache(out / "cache")
    owner = json.loads((out / "pool-labels.json").read_text())
    idx = [k for k, i in enumerate(cache.ids) if owner[i][0] in ("clean", "shouting")]
    labels = torch.tensor([owner[cache.ids[k]][1] for k in idx])
    ps = lensattr.PairStats.load(out / "pairs" / "shouting.safetensors")
    z = torch.zeros(len(idx), dtype=torch.float64)
    for member in auto["members"]:
        m = lensattr.Method.parse(member["method"])
        q = lensattr.behavior_query(None, ps, query=m.query, stat=m.stat, score=m.score, pool=cache)
        s = lensattr.rank(cache, q, layer=member["layer"], rows=idx, top_k=None).scores_of(idx)
        z += (s.double() - s.double().mean()) / s.double().std()
    want = lensattr.pool_metrics((z / len(auto["members"])).float(), labels, coding="planted")
    assert len(auto["members"]) > 1
    assert auto["p_at_k"] == pytest.approx(want["p_at_k"]) and auto["ap"] == pytest.approx(
        want["ap"]
    )
    assert len(auto["p_at_k_ci"]) == 2
    # the fine-tune on auto's top-k trains on that same ensemble's top-k, not on its best member's
    top = torch.topk(z, cfg.k).indices.tolist()
    tuned = json.loads((out / "ft" / "shouting" / "auto-s0.json").read_text())
    assert tuned["ids"] == [cache.ids[idx[i]] for i in top]
    # the report writes a layer set as the layers --layer takes, and plots it
    from lensattr.bench.report import write_outputs

    layers = sorted(int(la) for la in shout["grid"][auto["method"]]["layers"])[:2]
    as_set = json.loads(json.dumps(saved))
    as_set["ranking"]["shouting"]["auto"]["layer"] = layers[::-1]
    (tmp_path / "set").mkdir()
    write_outputs(as_set, tmp_path / "set")
    label = f"(L{layers[1]},{layers[0]})"
    assert label in (tmp_path / "set" / "results.md").read_text()
    assert set(res["finetune"]["shouting"]["methods"]) == set(cfg.ft_methods) - {"persona"}
    assert "| shouting | base model |" in md
    # resumable: a rerun reuses every saved step and gives the same numbers; a ranking saved
    # before the text-search and RepSim baselines gets them added
    f = out / "ranking" / "shouting.json"
    old = json.loads(f.read_text())
    keep = {"trak", "random"}
    f.write_text(json.dumps({**old, "baselines": {b: old["baselines"][b] for b in keep}}))
    again = run_bench(cfg, out, model=tiny)
    assert again["ranking"] == json.loads(json.dumps(res["ranking"]))
    # a saved fine-tune is reused only for the same top-k ids; others are redone, not stale
    f = out / "ft" / "shouting" / "random-s0.json"
    saved_ft = json.loads(f.read_text())
    f.write_text(json.dumps({**saved_ft, "score": 99.0}))
    assert run_bench(cfg, out, model=tiny)["finetune"]["shouting"]["methods"]["random"][
        "scores"
    ] == [99.0]
    f.write_text(json.dumps({**saved_ft, "score": 99.0, "ids": saved_ft["ids"][::-1]}))
    redone = run_bench(cfg, out, model=tiny)["finetune"]["shouting"]["methods"]["random"]
    assert redone["scores"] == [pytest.approx(saved_ft["score"])]
    assert json.loads(f.read_text())["ids"] == saved_ft["ids"]
    cfg.ft_methods = ["residual_change|resid_post|cosinee"]
    with pytest.raises(ValueError, match="unknown fine-tuning methods"):
        run_bench(cfg, out, model=tiny)


def test_bench_methods_take_any_registered_name(tiny, data_root, tmp_path):
    """A user's registered query rule and score are benchmarked by name, like a built-in."""
    from lensattr import registry
    from lensattr.bench import run_bench

    @registry.register_score("test_bench_abs_cos")
    def abs_cos(rows, norms, query, ctx=None):
        return ((rows @ query) / (norms * query.norm()).clamp(min=1e-12)).abs()

    try:
        cfg = smoke_config(data_root)
        cfg.ft_behaviours, cfg.trak, cfg.persona = [], False, False
        cfg.methods = ["residual_diff|resid_post|test_bench_abs_cos"]
        res = run_bench(cfg, tmp_path, model=tiny)["ranking"]["shouting"]
        assert set(res["grid"]) == {cfg.methods[0], "residual_change|residual_change|cosine"}
        assert res["auto"]["method"] in res["grid"]
    finally:
        registry.SCORE.pop("test_bench_abs_cos")


def test_trait_spec_split_16_12_12(data_root):
    b = load_behaviour(data_root / "traits" / "cheer.json")
    assert (len(b.query), len(b.heldout), len(b.plants)) == (16, 12, 24)
    assert b.labels == [1, 0] * 12 and b.persona is not None
    assert b.plants[0].response.startswith("Yay")


def test_trak_per_example_grads_match_a_loop(tiny):
    exs = [
        Example.from_prompt(f"e{i}", "hello there " * (i + 1), "yo " * (2 * i + 1))
        for i in range(3)
    ]
    encs = [encode(tiny.tokenizer, e, None) for e in exs]
    targets = default_targets(tiny, 2)
    batched = per_example_grads(tiny, collate(encs, tiny.pad_id), targets)
    mods = dict(tiny.hf.named_modules())
    for i, enc in enumerate(encs):
        b = collate([enc], tiny.pad_id)
        ws = [mods[t].weight for t in targets]
        for w in ws:
            w.requires_grad_(True)
        try:
            hidden = tiny.hf.base_model(input_ids=b.input_ids, attention_mask=b.attention_mask)[0]
            loss, _ = response_loss(hidden, tiny, b.input_ids, b.mask)
            loop = torch.autograd.grad(loss, ws)
        finally:
            for w in ws:
                w.requires_grad_(False)
        for t, g in zip(targets, loop, strict=True):
            torch.testing.assert_close(batched[t][i], g, rtol=1e-4, atol=1e-6)


def test_projector_is_seeded_and_chunk_invariant():
    x = torch.randn(3, 1000)
    a = Projector(1000, 16, seed=3, chunk=1000)(x)
    b = Projector(1000, 16, seed=3, chunk=1000, keep_bytes=0)(x)
    torch.testing.assert_close(a, b)
    # the projection is linear: P(x + y) = P x + P y
    p = Projector(1000, 16, seed=1, chunk=300)
    torch.testing.assert_close(p(x[:1] + x[1:2]), p(x[:1]) + p(x[1:2]), rtol=1e-4, atol=1e-5)


def test_trait_score_equals_direct_logprobs(tiny):
    pairs = [
        {"prompt": "Is it blue?", "treatment": "Yes, very blue!", "control": "No."},
        {"prompt": "Count", "treatment": "one two", "control": "three four five"},
    ]
    diffs = []
    for p in load_pairs(pairs):
        means = []
        for ex in p.sides():
            enc = encode(tiny.tokenizer, ex)
            ids = torch.tensor([enc.ids])
            with torch.no_grad():
                logits = tiny.hf(input_ids=ids).logits[0].double()
            logp = F.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
            means.append(float(logp[enc.n_prompt - 1 :].mean()))
        diffs.append(means[0] - means[1])
    assert trait_score(tiny, pairs) == pytest.approx(float(np.mean(diffs)), abs=1e-4)


def test_lora_finetune_moves_the_score_and_leaves_base(tiny):
    pairs = [{"prompt": "Hi", "treatment": "Yes yes", "control": "No"}]
    before = trait_score(tiny, pairs)
    train = [{"id": f"a{i}", "prompt": "Hi", "response": "Yes yes"} for i in range(4)]
    tuned = lora_finetune(tiny, train, steps=8, lr=1e-2, rank=4, seed=0)
    assert trait_score(tuned, pairs) > before
    assert trait_score(tiny, pairs) == pytest.approx(before)


def _np_moments(x, ridge=1e-2):
    mu = x.mean(0)
    sigma = np.cov(x, rowvar=False)
    lam = ridge * np.trace(sigma) / x.shape[1]
    evals, evecs = np.linalg.eigh(sigma + lam * np.eye(x.shape[1]))
    return mu, evecs @ np.diag(evals**-0.5) @ evecs.T


def _np_cos(a, b):
    return a @ b / (np.linalg.norm(a, axis=1) * np.linalg.norm(b))


def test_centered_and_whitened_cosine_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)) + np.array([50.0, 0, 0, 0, 0, 0])  # an outlier dimension
    vec = rng.normal(size=6)
    rows, v = torch.tensor(x, dtype=torch.float32), torch.tensor(vec, dtype=torch.float32)
    mu, w = _np_moments(x)
    np.testing.assert_allclose(
        centered_cosine(rows, rows.norm(dim=1), v).numpy(),
        _np_cos(x - mu, vec),
        rtol=1e-4,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        whitened_cosine(rows, rows.norm(dim=1), v).numpy(),
        _np_cos((x - mu) @ w, w @ vec),
        rtol=1e-4,
        atol=1e-5,
    )


def test_scores_read_moments_from_the_cache(tiny, train_records, tmp_path, monkeypatch):
    import lensattr.moments
    from lensattr import build_cache
    from lensattr.moments import ScoreContext

    monkeypatch.setattr(lensattr.moments, "PERSIST_ROWS", 0)

    cache = build_cache(
        tiny,
        train_records,
        out=tmp_path / "c",
        layers=[2],
        stats=["resid_post"],
        storage_dtype="fp32",
    )
    x = cache.stat("resid_post", 2)[:].double().numpy()
    vec = torch.randn(x.shape[1])
    mu, w = _np_moments(x)
    ctx = ScoreContext(cache=cache, stat="resid_post", layer=2)
    rows = torch.tensor(x[:5], dtype=torch.float32)  # a block of rows: moments still from all
    got = whitened_cosine(rows, rows.norm(dim=1), vec, ctx).numpy()
    np.testing.assert_allclose(
        got, _np_cos((x[:5] - mu) @ w, w @ vec.double().numpy()), rtol=1e-3, atol=1e-4
    )
    got = centered_cosine(rows, rows.norm(dim=1), vec, ctx).numpy()
    np.testing.assert_allclose(got, _np_cos(x[:5] - mu, vec.double().numpy()), rtol=1e-4, atol=1e-5)
    assert (tmp_path / "c" / "moments-resid_post-2.safetensors").exists()


def test_cli_bench_smoke(tmp_path, capsys):
    from lensattr.cli import build_parser

    args = build_parser().parse_args(["bench", "--smoke", "--out", str(tmp_path)])
    assert args.smoke and args.command == "bench"


def test_judge_reads_key_from_env_and_parses_score(monkeypatch):
    import io

    from lensattr.bench import judge

    seen = {}

    def fake_urlopen(req, timeout):
        seen["auth"] = req.headers.get("Authorization")
        seen["url"] = req.full_url
        body = {"choices": [{"message": {"content": "Score: 2"}}]}
        return io.BytesIO(json.dumps(body).encode())

    monkeypatch.setenv("LENSATTR_JUDGE_API_KEY", "sk-test")
    monkeypatch.setattr(judge.urllib.request, "urlopen", fake_urlopen)
    got = judge.judge_score(
        "Q?", "A.", judge.RUBRICS["medical_hallucination"], url="http://localhost:1/v1", model="m"
    )
    assert got == 2 and seen["auth"] == "Bearer sk-test"
    assert seen["url"] == "http://localhost:1/v1/chat/completions"
