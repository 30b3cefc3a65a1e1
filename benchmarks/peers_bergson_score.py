"""bergson's side of ``bench_peers.py``: score a train gradient store against a behaviour query.

Runs in bergson's own virtual environment (``.venv-bergson``), never in lensattr's:

    .venv-bergson/bin/python benchmarks/peers_bergson_score.py TRAIN TREATMENT CONTROL OUT.json

TRAIN, TREATMENT and CONTROL are stores written by ``bergson build`` (same model, projection and
seed); the query is treatment minus control, as in lensattr's residual change. Four query modes,
built from bergson's own functions (``load_module_gradients``, ``invert_psd_matrix``,
``DensePreconditioner``):

- ``dot``: train gradient . (mean treatment - mean control);
- ``unit``: every gradient unit-normalised first (bergson's ``unit_normalize``);
- ``precond``: one-sided, the query times H^-1;
- ``precond_unit``: two-sided, H^-1/2 on the train and query gradients, then unit-normalised
  (what ``bergson query --unit_norm --hessian_path`` does).

H is the per-module autocorrelation (second moment) of the projected train gradients, inverted
with bergson's default ``damped_inverse`` (damping 0.1 of the mean eigenvalue): what
``bergson hessian --method autocorrelation`` fits on the same rows, computed here from the store
instead of in a second gradient pass. Writes ``{mode: [score per train row]}`` and the seconds.
"""

import json
import sys
import time

import torch
from bergson import load_module_gradients
from bergson.hessians.inversion import invert_psd_matrix
from bergson.hessians.preconditioner import DensePreconditioner


def load(path: str) -> dict[str, torch.Tensor]:
    grads = load_module_gradients(path)
    return {name: torch.from_numpy(grads[name].copy()).float() for name in grads}


def unit(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    norms = torch.cat(list(grads.values()), dim=1).norm(dim=1, keepdim=True).clamp_min(1e-30)
    return {k: v / norms for k, v in grads.items()}


def contrast(t: dict[str, torch.Tensor], c: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t[k].mean(0, keepdim=True) - c[k].mean(0, keepdim=True) for k in t}


def dot(train: dict[str, torch.Tensor], q: dict[str, torch.Tensor]) -> list[float]:
    return sum(train[k] @ q[k].T for k in train)[:, 0].tolist()  # type: ignore[union-attr]


def main() -> None:
    train_dir, t_dir, c_dir, out = sys.argv[1:5]
    t0 = time.perf_counter()
    train, t, c = load(train_dir), load(t_dir), load(c_dir)
    n = next(iter(train.values())).shape[0]
    gram = {k: v.T @ v / n for k, v in train.items()}
    h_inv = DensePreconditioner({k: invert_psd_matrix(h, power=-1.0) for k, h in gram.items()})
    h_half = DensePreconditioner({k: invert_psd_matrix(h, power=-0.5) for k, h in gram.items()})
    scores = {
        "dot": dot(train, contrast(t, c)),
        "unit": dot(unit(train), contrast(unit(t), unit(c))),
        "precond": dot(train, h_inv.apply(contrast(t, c))),
        "precond_unit": dot(
            unit(h_half.apply(train)), contrast(unit(h_half.apply(t)), unit(h_half.apply(c)))
        ),
    }
    with open(out, "w") as f:
        json.dump({"scores": scores, "seconds": time.perf_counter() - t0, "n": n}, f)


if __name__ == "__main__":
    main()
