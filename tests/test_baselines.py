"""lensattr.baselines: each lexical kind against numpy by hand, the label-free choice, the extra."""

import math
import re
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from lensattr.baselines import BM25_B, BM25_K1, LEXICAL, lexical_scores, lexical_select
from lensattr.criterion import heldout_auroc, heldout_log_rank
from lensattr.query import interleaved_folds

POOL = ["Yes", "No", "I am so sorry, that sounds hard", "The capital is Paris.", "a b a"]
TREATMENT = ["Yes", "I am sorry to hear that"]
CONTROL = ["No", "The answer is Paris"]


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def tfidf_by_hand(docs: list[str]) -> np.ndarray:
    """Unigrams + bigrams, 1 + log tf, idf log((1 + n) / (1 + df)) + 1, unit rows."""
    grams = []
    for d in docs:
        w = words(d)
        grams.append(Counter(w + [f"{a} {b}" for a, b in zip(w, w[1:], strict=False)]))
    vocab = sorted({g for c in grams for g in c})
    n = len(docs)
    df = {g: sum(g in c for c in grams) for g in vocab}
    x = np.zeros((n, len(vocab)))
    for i, c in enumerate(grams):
        for j, g in enumerate(vocab):
            if c[g]:
                x[i, j] = (1 + math.log(c[g])) * (math.log((1 + n) / (1 + df[g])) + 1)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1, norms)


def cosine(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    return x @ q / np.linalg.norm(q)


def bm25_by_hand(docs: list[str], bag: list[str]) -> np.ndarray:
    toks = [words(d) for d in docs]
    n, avgdl = len(docs), sum(map(len, toks)) / len(docs)
    out = np.zeros(n)
    for i, t in enumerate(toks):
        tf = Counter(t)
        for w in bag:
            df = sum(w in u for u in toks)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            out[i] += idf * tf[w] / (tf[w] + BM25_K1 * (1 - BM25_B + BM25_B * len(t) / avgdl))
    return out


@pytest.mark.parametrize("kind", LEXICAL)
def test_each_kind_matches_numpy_by_hand(kind):
    docs = [*POOL, *TREATMENT, *CONTROL]  # fitted on the pool plus the pairs' replies
    n, nt = len(POOL), len(TREATMENT)
    if kind == "bm25_treatment":
        want = bm25_by_hand(docs, [w for t in TREATMENT for w in words(t)])[:n]
    else:
        x = tfidf_by_hand(docs)
        q = x[n : n + nt].mean(0)
        if kind == "tfidf_contrast":
            q = q - x[n + nt :].mean(0)
        elif kind == "tfidf_pool_contrast":
            q = q - x[:n].mean(0)
        want = cosine(x[:n], q)
    got = lexical_scores(POOL, TREATMENT, CONTROL, kind)
    assert got.dtype == torch.float32 and got.shape == (len(POOL),)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert got[0] > got[3]  # "Yes" is a treatment reply; the Paris answer is a control's


def test_one_word_replies_and_one_letter_words_count():
    """Persona replies are one word, and "No", "I", "a" are on the usual English stop list."""
    s = lexical_scores(["No", "Yes", "I", "x"], ["No", "No"], ["Yes", "Yes"], "tfidf_contrast")
    assert s[0] > 0 > s[1] and s[2] == 0 == s[3]
    b = lexical_scores(["I", "a", "no"], ["I"], ["a"], "bm25_treatment")
    assert b[0] > 0 and b[1] == 0 == b[2]


def test_a_zero_query_scores_every_text_zero():
    s = lexical_scores(["Yes", "No"], ["Yes"], ["Yes"], "tfidf_contrast")
    assert s.tolist() == [0.0, 0.0]
    assert lexical_scores(["Yes", "..."], ["!!"], [], "bm25_treatment").tolist() == [0.0, 0.0]


def toy():
    """The behaviour: the reply says sorry. Each control is its treatment without the apology,
    and the pool is full of texts on the pairs' topics: a query of the treatments alone points
    at the topics too, the treatment-minus-control contrast at the apology only."""
    topics = ["rain", "exam", "train", "job", "cat", "flight", "game", "phone"]
    t = [f"Sorry. The {w} news today: {w} {w}" for w in topics]
    c = [f"The {w} news today: {w} {w}" for w in topics]
    pool = [f"The {w} news today: {w} {w} {w}" for w in topics for _ in range(3)]
    return [*pool, "Sorry.", "So sorry.", "Sorry, sorry"], t, c


def test_select_scores_each_kind_by_the_criterion_on_interleaved_folds():
    """tfidf_contrast's row recomputed by hand: per fold, the query from the other folds'
    replies, the held-out replies scored in the one fit (the pool plus every pair's reply)."""
    pool, t, c = toy()
    _, table = lexical_select(pool, t, c, folds=4)
    row = next(r for r in table if r["kind"] == "tfidf_contrast")
    n, m = len(pool), len(t)
    x = tfidf_by_hand([*pool, *t, *c])
    lr, au, hits = [], [], 0
    for test, train in interleaved_folds(m, 4):
        tr = train.numpy()
        q = x[n : n + m][tr].mean(0) - x[n + m :][tr].mean(0)
        s = torch.from_numpy(cosine(x, q)).float()
        s_t, s_c = s[n + test], s[n + m + test]
        lr.append(heldout_log_rank(s_t, torch.cat([s[:n], s_c])))
        au.append(heldout_auroc(s_t, s_c))
        hits += int((s_t > s_c).sum())
    assert row["log_rank"] == pytest.approx(sum(lr) / len(lr), abs=1e-5)
    assert row["auroc"] == pytest.approx(sum(au) / len(au), abs=1e-9)
    assert row["accuracy"] == hits / m
    assert row["criterion"] == pytest.approx(row["log_rank"] * row["auroc"], abs=1e-9)


def test_select_chooses_a_kind_that_separates_an_obvious_toy_set():
    pool, t, c = toy()
    kind, table = lexical_select(pool, t, c)
    assert [r["kind"] for r in table] == list(LEXICAL)
    best = max(r["criterion"] for r in table)
    assert next(r for r in table if r["kind"] == kind)["criterion"] == best
    assert kind == "tfidf_contrast"
    sorry = {i for i, x in enumerate(pool) if "orry" in x}

    def top(kind: str) -> set[int]:
        return set(lexical_scores(pool, t, c, kind).topk(len(sorry)).indices.tolist())

    assert top(kind) == sorry
    assert top("tfidf_treatment") != sorry  # the topic words win there


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: lexical_scores(["a"], ["a"], [], "tfidf"), "one of tfidf_treatment"),
        (lambda: lexical_scores([], ["a"], [], "tfidf_treatment"), "texts: no texts"),
        (lambda: lexical_scores(["a"], ["a"], [], "tfidf_contrast"), "control: no texts"),
        (lambda: lexical_scores(["a"], "abc", [], "tfidf_treatment"), "not one string"),
        (lambda: lexical_select(["a"], ["a", "b"], ["c"]), "2 replies and pairs_control 1"),
        (lambda: lexical_select(["a"], ["a"], ["c"]), "at least 2 pairs"),
        (lambda: lexical_select(["a"], ["a", "b"], ["c", "d"], folds=1), "folds=1"),
    ],
)
def test_bad_arguments_are_one_line_errors_naming_them(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize("blocked", ["bm25s", "sklearn"])
def test_a_missing_package_names_the_extra(blocked, monkeypatch):
    for name in [m for m in sys.modules if m == blocked or m.startswith(f"{blocked}.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(ModuleNotFoundError) as info:
        lexical_scores(["a"], ["a"], [], "tfidf_treatment")
    msg = str(info.value)
    assert msg.startswith(f"{blocked} is not installed") and "\n" not in msg
    assert "pip install 'lensattr[bench]'" in msg
