"""Persona-vector pairs: the model's own greedy replies under positive vs neutral system prompts.

A trait spec (``../shared/data/traits/*.json`` schema) gives ``positive_system_prompts``, their
matched opposites ``negative_system_prompts`` (the neutral side) and ``questions``. For every
question and every prompt pair ``i`` the model answers greedily under both system prompts; the
persona query is then ``norm(mean(pooled z_out | positive) - mean(pooled z_out | neutral))`` over
the generated reply tokens (Chen et al., persona vectors).
"""

import json
from pathlib import Path
from typing import Any

import torch

from lensattr.backends.models import Model
from lensattr.data import Pair


def load_trait(source: Any) -> dict[str, Any]:
    """A trait spec from a path or a dict, checked for the fields persona vectors need."""
    spec = json.loads(Path(source).read_text()) if isinstance(source, (str, Path)) else source
    for key in ("positive_system_prompts", "negative_system_prompts", "questions"):
        if not isinstance(spec.get(key), list) or not spec[key]:
            raise ValueError(f"trait spec {source!r}: field {key!r} must be a non-empty list")
    return spec


@torch.no_grad()
def generate(
    model: Model, chats: list[list[dict[str, str]]], max_new_tokens: int, batch_size: int = 8
) -> list[str]:
    """Greedy replies to ``chats`` (left-padded batches)."""
    tok = model.tokenizer
    out: list[str] = []
    for i in range(0, len(chats), batch_size):
        texts = [
            tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in chats[i : i + batch_size]
        ]
        enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), model.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for j, e in enumerate(enc):
            ids[j, width - len(e) :] = torch.tensor(e)
            attn[j, width - len(e) :] = 1
        gen = model.hf.generate(
            input_ids=ids.to(model.device),
            attention_mask=attn.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.pad_id,
            eos_token_id=tok.eos_token_id,
        )
        out += [tok.decode(g[width:], skip_special_tokens=True).strip() for g in gen]
    return out


def persona_pairs(
    model: Model,
    source: Any,
    *,
    max_new_tokens: int = 48,
    max_questions: int | None = None,
    batch_size: int = 8,
) -> list[Pair]:
    """Generate the positive/neutral reply pairs of a trait spec (empty replies dropped)."""
    spec = load_trait(source)
    pos, neg = spec["positive_system_prompts"], spec["negative_system_prompts"]
    questions = spec["questions"][:max_questions]
    combos = [(q, i) for q in questions for i in range(min(len(pos), len(neg)))]
    chats = [
        [{"role": "system", "content": s[i]}, {"role": "user", "content": q}]
        for q, i in combos
        for s in (pos, neg)
    ]
    replies = generate(model, chats, max_new_tokens, batch_size)
    pairs = []
    for k, (q, i) in enumerate(combos):
        t, c = replies[2 * k], replies[2 * k + 1]
        if t and c:
            pairs.append(
                Pair(
                    id=f"persona-{k}",
                    prompt=q,
                    treatment=t,
                    control=c,
                    system=pos[i],
                    control_system=neg[i],
                )
            )
    return pairs
