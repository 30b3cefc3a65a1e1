"""lensattr.plot: figures returned, saved only when asked, pyplot's state and backend untouched."""

import matplotlib
import pytest
import torch

from lensattr import behavior_query, build_cache, metrics, rank
from lensattr.plot import layer_sweep, plot_sweep


@pytest.fixture(scope="module")
def swept(tiny, train_records, pair_records, tmp_path_factory):
    cache = build_cache(
        tiny, train_records, out=tmp_path_factory.mktemp("c"), layers=[1, 2, 3], progress=False
    )
    q = behavior_query(tiny, pair_records, layers=[1, 2, 3], score="dot")
    labels = [int(i % 3 == 0) for i in range(len(cache))]
    return cache, q, labels


def test_layer_sweep_is_pool_metrics_at_each_layer_with_the_querys_score(swept):
    cache, q, labels = swept
    rows = layer_sweep(cache, q, labels)
    assert [r["layer"] for r in rows] == [1, 2, 3]
    for r in rows:
        scores = rank(cache, q, layer=r["layer"], score="dot", top_k=None)
        want = metrics.pool_metrics(scores.scores_of(range(len(cache))), labels)
        assert {k: r[k] for k in want} == pytest.approx(want)
        assert r["heldout_accuracy"] == pytest.approx(q.cv[r["layer"]])
    cos = layer_sweep(cache, q, labels, score="cosine")
    direct = torch.nn.functional.cosine_similarity(
        cache.stat("residual_change", 2)[:].float(), q.vector(2)[None], dim=1
    )
    assert cos[1]["auroc"] == pytest.approx(metrics.auroc(direct, torch.tensor(labels)))


def test_plot_sweep_returns_a_figure_and_leaves_pyplot_alone(swept, tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    cache, q, labels = swept
    rows = layer_sweep(cache, q, labels)
    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    fig = plot_sweep({"dot": (rows, (3, 1), 0.5)}, title="t")
    assert isinstance(fig, Figure)
    assert matplotlib.get_backend() == backend and plt.get_fignums() == figures
    assert list(tmp_path.iterdir()) == []  # no path: nothing saved
    first = fig.axes[0].lines[0]
    assert list(first.get_xdata()) == [1, 2, 3]
    assert list(first.get_ydata()) == [r["p_at_k"] for r in rows]
    dots = fig.axes[0].lines[1]
    assert list(dots.get_xdata()) == [3, 1] and list(dots.get_ydata()) == [
        rows[2]["p_at_k"],
        rows[0]["p_at_k"],
    ]
    assert list(fig.axes[0].lines[2].get_ydata()) == [0.5, 0.5]  # the layer set's mean
    path = tmp_path / "sweep.png"
    plot_sweep({"dot": (rows, 2, None)}, path, metric="ap")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == backend and plt.get_fignums() == figures
