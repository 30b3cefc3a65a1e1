"""lensattr: which training examples make an LLM behave a certain way, in activation space.

Cache one vector per training example and layer in a single forward + activation-backward pass
(:func:`build_cache`), build a behaviour query from treatment/control pairs
(:func:`behavior_query`), and rank the training set against it (:func:`rank`).

Examples:
    >>> import tempfile, lensattr
    >>> model = lensattr.load_model("tiny-random")
    >>> train = [{"id": f"t{i}", "prompt": "Hi", "response": "ok " * (i + 1)} for i in range(4)]
    >>> cache = lensattr.build_cache(model, train, out=tempfile.mkdtemp(), layers=[2])
    >>> pairs = [{"prompt": "Hi", "treatment": "ok ok", "control": "Hello."}]
    >>> query = lensattr.behavior_query(model, pairs, layers=[2])
    >>> ranking = lensattr.rank(cache, query, layer=2, top_k=2)
    >>> len(ranking.ids)
    2

    With four or more pairs, :func:`select` (``rank(..., method="auto")``) chooses the
    statistic, query, score and layer from the pairs and the unlabelled cache.
"""

import importlib as _importlib
import warnings as _warnings

with _warnings.catch_warnings():
    # tqdm.auto (imported by transformers, datasets and huggingface_hub) warns "IProgress not
    # found" on import in a notebook without ipywidgets; lensattr's own bars do without it.
    _warnings.filterwarnings("ignore", message="IProgress not found")
    _importlib.import_module("tqdm.auto")

# The built-in statistics, queries and scores register themselves on import: first, so that
# every registry lookup sees them (importing any submodule imports this package first).
import lensattr.methods  # noqa: F401, E402  (isort: skip)
from lensattr._version import __version__
from lensattr.backends.capture import LayerActs, capture
from lensattr.backends.models import Model, load_model
from lensattr.build import build_cache
from lensattr.config import CaptureConfig
from lensattr.data import DataError, Example, Pair, load_examples, load_pairs
from lensattr.ensemble import Ensemble
from lensattr.metrics import pool_metrics, pool_metrics_difference
from lensattr.query import PairStats, Query, QueryError, behavior_query, pair_stats
from lensattr.rank import Ranking, explain, rank
from lensattr.registry import register_criterion, register_query, register_score, register_stat
from lensattr.select import PAPER, Method, Selection, candidates, select, select_then_cache
from lensattr.store.cache import Cache, CacheError, open_cache

__all__ = [
    "__version__",
    "PAPER",
    "Method",
    "PairStats",
    "QueryError",
    "Selection",
    "candidates",
    "pair_stats",
    "pool_metrics",
    "pool_metrics_difference",
    "select",
    "select_then_cache",
    "Cache",
    "CacheError",
    "CaptureConfig",
    "DataError",
    "Ensemble",
    "Example",
    "LayerActs",
    "Model",
    "Pair",
    "Query",
    "Ranking",
    "behavior_query",
    "build_cache",
    "capture",
    "explain",
    "load_examples",
    "load_model",
    "load_pairs",
    "open_cache",
    "rank",
    "register_criterion",
    "register_stat",
    "register_query",
    "register_score",
]
