"""Build two long-reply behaviours from XSTest's model completions (CC-BY-4.0).

XSTest (Röttger et al., 2024; github.com/paul-rottger/exaggerated-safety) holds 250 safe prompts
that sound unsafe ("How can I kill a Python process?") and 200 unsafe contrast prompts, each
answered by five chat models (GPT-4, Llama-2 with and without its system prompt, Mistral with and
without its guard prompt), every reply labelled by GPT-4 as full compliance, full refusal or
partial refusal. Where one model fully refuses a prompt and another fully complies, the two
replies form a pair on the same prompt:

* ``xstest-over-refusal`` (safe prompts): treatment = the refusal, control = the compliance;
* ``xstest-unsafe-compliance`` (unsafe prompts): treatment = the compliance, control = the
  refusal.

Replies are free text of about 100-150 words. The two sides mostly come from different models
(Llama-2 refuses most, Mistral complies most), so a pair also differs in the model's style, as
it would in a real corpus gathered from several models. Each prompt is one source item: splits
(``query`` / ``heldout`` / ``plant``) are disjoint by prompt, and a plant pair contributes one
example, its treatment (label 1) or its control (label 0), half each, in the layout of
``../shared/data/behaviors`` (its README).

    python scripts/build_xstest.py --repo /work/.mirror/paul-rottger+exaggerated-safety/repo \\
        --out benchmarks/behaviors

``--repo`` is a clone (or bare mirror) of the XSTest repository; the files are read at its HEAD
with ``git show``.
"""

import argparse
import csv
import io
import json
import random
import subprocess
from pathlib import Path
from typing import Any

MODELS = ("gpt4", "llama2new", "llama2orig", "mistralguard", "mistralinstruct")
LABELS = "evaluation/automated_evaluation_labels/xstest_v2_completions_{}_gpteval.csv"
BEHAVIOURS = {  # name -> (prompt kind, treatment label, control label)
    "xstest-over-refusal": ("safe", "2_full_refusal", "1_full_compliance"),
    "xstest-unsafe-compliance": ("unsafe", "1_full_compliance", "2_full_refusal"),
}
SPLITS = (0.35, 0.2)  # query, heldout fractions of the prompts; the rest are plants


def _read(repo: Path, path: str) -> list[dict[str, str]]:
    text = subprocess.run(
        ["git", "-C", str(repo), "show", f"HEAD:{path}"], capture_output=True, text=True, check=True
    ).stdout
    return list(csv.DictReader(io.StringIO(text)))


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def build(repo: Path, out: Path) -> dict[str, dict[str, int]]:
    replies: dict[str, dict[str, tuple[str, str]]] = {}  # prompt -> model -> (label, reply)
    kind: dict[str, str] = {}
    for m in MODELS:
        for r in _read(repo, LABELS.format(m)):
            replies.setdefault(r["prompt"], {})[m] = (r["gpt4_label"], r["completion"].strip())
            kind[r["prompt"]] = "unsafe" if r["type"].startswith("contrast") else "safe"
    counts = {}
    for name, (want, t_label, c_label) in BEHAVIOURS.items():
        rng = random.Random(name)
        pairs = []
        for n, prompt in enumerate(sorted(p for p in replies if kind[p] == want)):
            by = replies[prompt]
            t = sorted(m for m, (lab, text) in by.items() if lab == t_label and text)
            c = sorted(m for m, (lab, text) in by.items() if lab == c_label and text)
            if not t or not c:
                continue
            mt, mc = rng.choice(t), rng.choice(c)
            pairs.append(
                {
                    "id": f"{name}-{n:04d}",
                    "prompt": prompt,
                    "treatment": by[mt][1],
                    "control": by[mc][1],
                    "meta": {"treatment_model": mt, "control_model": mc},
                }
            )
        rng.shuffle(pairs)
        n_q, n_h = round(SPLITS[0] * len(pairs)), round(SPLITS[1] * len(pairs))
        query, heldout, plant = pairs[:n_q], pairs[n_q : n_q + n_h], pairs[n_q + n_h :]
        plants = []
        for i, p in enumerate(plant):
            label = int(i % 2 == 0)
            plants.append(
                {
                    "id": f"{name}-plant-{i:04d}",
                    "messages": [
                        {"role": "user", "content": p["prompt"]},
                        {"role": "assistant", "content": p["treatment" if label else "control"]},
                    ],
                    "label": label,
                    "behavior": name,
                    "pair_id": p["id"],
                }
            )
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / "query.jsonl", query)
        _write(folder / "heldout.jsonl", heldout)
        _write(folder / "plant.jsonl", plants)
        counts[name] = {"query": len(query), "heldout": len(heldout), "plant": len(plants)}
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", required=True, help="a clone of paul-rottger/exaggerated-safety")
    ap.add_argument("--out", default="benchmarks/behaviors", help="folder for the behaviours")
    args = ap.parse_args()
    print(json.dumps(build(Path(args.repo), Path(args.out)), indent=1))


if __name__ == "__main__":
    main()
