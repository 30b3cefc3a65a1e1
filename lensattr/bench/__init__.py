"""The attribution benchmark: planted recovery over the method grid and the fine-tuning effect.

``run_bench(config, out)`` (CLI: ``lensattr bench``) builds one cache over the pool (a clean
subsample plus every behaviour's plants), ranks each behaviour's sub-pool with every method at
every layer, chooses layers and the best method from the query pairs alone, and optionally
LoRA-fine-tunes on each method's top-k and measures the trait score on held-out pairs. See
``docs/results.md`` for the protocol and a real run.

Examples:
    >>> from lensattr.bench import BenchConfig, lora_finetune, trait_score  # doctest: +SKIP
"""

import logging
import time
from pathlib import Path
from typing import Any

from lensattr.bench.finetune import lora_finetune, trait_score
from lensattr.bench.run import BenchConfig, config_dict, prepare, run_trak, say
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
    from lensattr.bench.planted import planted_recovery
    from lensattr.bench.report import write_outputs

    out = Path(out)
    t0 = time.perf_counter()
    h = prepare(cfg, out, model, trak_now=False)
    say("planted recovery: scoring the grid")
    planted = planted_recovery(cfg, h, out)
    results: dict[str, Any] = {"config": config_dict(cfg), "planted": planted}
    results["cost"] = dict(h["costs"].data)
    write_outputs(results, out)  # the activation-space grid first; TRAK (slow) is added next
    if cfg.trak:
        h["trak"] = run_trak(h["model"], cfg, out, h["cache"], h["behaviours"], h["costs"])
        planted = results["planted"] = planted_recovery(cfg, h, out)
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
        results["finetune"] = finetune_effect(cfg, h, planted, out)
        results["cost"] = dict(h["costs"].data)
        write_outputs(results, out)
    say(
        f"done in {time.perf_counter() - t0:.0f} s this session; total recorded cost "
        f"{sum(results['cost'].values()):.0f} s; outputs in {out}"
    )
    return results


__all__ = ["BenchConfig", "run_bench", "lora_finetune", "trait_score", "smoke_config"]
