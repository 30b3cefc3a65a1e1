"""Optional LLM judge behind any OpenAI-compatible ``/chat/completions`` endpoint (off by default).

Only ``urllib`` is used; the API key is read from an environment variable (default
``LENSATTR_JUDGE_API_KEY``) and never logged or written anywhere. Nothing in the tests or the
default benchmark calls it.

Rubrics (the paper's): instruction following and factuality 0-3; medical hallucination 0-2
(0 correct, 1 no answer, 2 hallucinated); personality traits use the trait spec's
``judge_rubric`` (0-3).
"""

import json
import logging
import os
import re
import urllib.request
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

RUBRICS = {
    "instruction_following": (
        "Score how well the reply follows the user's instruction. 0 = ignores it, 1 = partly "
        "follows it, 2 = mostly follows it, 3 = follows it fully. Answer with the number only."
    ),
    "factuality": (
        "Score the factual accuracy of the reply. 0 = mostly false, 1 = several errors, "
        "2 = minor errors, 3 = fully accurate. Answer with the number only."
    ),
    "medical_hallucination": (
        "The user asks a medical question with context; a reference answer is given. Score the "
        "reply: 0 = correct (agrees with the reference), 1 = no answer / declines, "
        "2 = hallucinated (states unsupported or wrong findings). Answer with the number only."
    ),
}


def judge_score(
    prompt: str,
    reply: str,
    rubric: str,
    *,
    url: str,
    model: str,
    key_env: str = "LENSATTR_JUDGE_API_KEY",
    reference: str | None = None,
    timeout: float = 60.0,
) -> int | None:
    """One judge call: the integer score the judge gives ``reply`` (``None`` when unparsable).

    Args:
        prompt, reply: the user message and the reply to judge.
        rubric: a rubric text (see :data:`RUBRICS` or a trait spec's ``judge_rubric``).
        url: the endpoint base, e.g. ``https://api.example.com/v1``.
        model: the judge model name.
        key_env: environment variable holding the API key (optional for local servers).
        reference: a reference answer shown to the judge (medical hallucination).
    """
    user = f"Rubric:\n{rubric}\n\nUser message:\n{prompt}\n\n"
    if reference is not None:
        user += f"Reference answer:\n{reference}\n\n"
    user += f"Reply to score:\n{reply}\n\nScore:"
    body = {
        "model": model,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "You are a strict grader. Reply with one integer."},
            {"role": "user", "content": user},
        ],
    }
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(
        url.rstrip("/") + "/chat/completions", json.dumps(body).encode(), headers
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (user-given URL)
        data: Any = json.loads(resp.read())
    text = data["choices"][0]["message"]["content"]
    m = re.search(r"\d+", text)
    if m is None:
        logger.warning("judge gave no score")
        return None
    return int(m.group())


def judge_model(
    model: Any,
    prompts: Sequence[str],
    rubric: str,
    *,
    url: str,
    judge: str,
    max_new_tokens: int = 96,
    references: Sequence[str] | None = None,
    key_env: str = "LENSATTR_JUDGE_API_KEY",
) -> float:
    """Greedy replies of ``model`` to ``prompts``, scored by the judge; the mean score."""
    from lensattr.persona import generate

    replies = generate(model, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens)
    scores = [
        judge_score(
            p,
            r,
            rubric,
            url=url,
            model=judge,
            key_env=key_env,
            reference=None if references is None else references[i],
        )
        for i, (p, r) in enumerate(zip(prompts, replies, strict=True))
    ]
    valid = [s for s in scores if s is not None]
    return sum(valid) / len(valid) if valid else float("nan")
