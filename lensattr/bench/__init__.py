"""The attribution benchmark: each behaviour ranked inside a realistic pool, and the fine-tuning
effect.

``run_bench(config, out)`` (CLI: ``lensattr bench``) caches one pool (every behaviour's plants
plus the whole clean corpus), ranks each behaviour among the clean corpus and its own plants with
``auto`` (:func:`lensattr.select`), every registered method at every layer, the paper's residual
change and the baselines, and optionally LoRA-fine-tunes on each method's top-k and measures the
trait score on held-out pairs. It uses the public API only. See ``docs/results.md``.

Examples:
    >>> from lensattr.bench import BenchConfig, lora_finetune, trait_score  # doctest: +SKIP
"""

import logging
import time
from pathlib import Path
from typing import Any

from lensattr.bench.finetune import lora_finetune, trait_score
from lensattr.bench.run import BenchConfig, config_dict, prepare, say
from lensattr.bench.smoke import smoke_config

logger = logging.getLogger(__name__)


def run_bench(cfg: BenchConfig, out: str | Path, *, model: Any = None) -> dict[str, Any]:
    """Run (or resume) the benchmark into ``out`` and write its outputs.

    Args:
        cfg: the settings.
        out: output directory (every step's output is kept there; a rerun resumes).
        model: an already loaded model (default: ``load_model(cfg.model)``).

    Returns:
        The results dict also written to ``out/results.json``.
    """
    from lensattr.bench.effect import finetune_effect
    from lensattr.bench.ranking import pool_ranking
    from lensattr.bench.report import write_outputs

    out = Path(out)
    t0 = time.perf_counter()
    h = prepare(cfg, out, model)
    say("ranking every behaviour inside the pool")
    ranking = pool_ranking(cfg, h, out)
    results: dict[str, Any] = {"config": config_dict(cfg), "ranking": ranking}
    if h["trak"] is not None:
        results["trak"] = {
            "targets": h["trak"]["targets"],
            "n_params": h["trak"]["n_params"],
            "dim": cfg.trak_dim,
            "seconds_per_example": h["trak"]["seconds_per_example"],
        }
    n_pool = len(h["cache"])
    results["cost"] = dict(h["costs"].data)
    results["cost_per_example"] = {
        "activation_cache": h["costs"].data.get("cache_pool", 0.0) / max(n_pool, 1),
        "trak": results.get("trak", {}).get("seconds_per_example"),
    }
    write_outputs(results, out)
    if cfg.ft_behaviours:
        say("fine-tuning effect")
        results["finetune"] = finetune_effect(cfg, h, ranking, out)
        results["cost"] = dict(h["costs"].data)
        write_outputs(results, out)
    say(
        f"done in {time.perf_counter() - t0:.0f} s this session; total recorded cost "
        f"{sum(results['cost'].values()):.0f} s; outputs in {out}"
    )
    return results


__all__ = ["BenchConfig", "run_bench", "lora_finetune", "trait_score", "smoke_config"]
