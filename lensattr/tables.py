"""Rankings and explanations as text (for a terminal) and HTML (for a notebook).

:class:`~lensattr.rank.Ranking` and :class:`~lensattr.rank.Explanation` show themselves with
these in a notebook (``_repr_html_``); ``lensattr rank`` and ``lensattr explain`` print the text
forms.
"""

import html
import math
from collections.abc import Sequence
from typing import Any

EXCERPT = 60
"""Characters of a reply shown in a ranking's table."""


def excerpt(text: str, width: int = EXCERPT) -> str:
    """``text`` on one line, cut to ``width`` characters (``...`` where cut).

    Examples:
        >>> excerpt("one\\ntwo  three", 9)
        'one tw...'
    """
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: max(width - 3, 0)] + "..."


def layers_text(layers: Sequence[int]) -> str:
    """Layers for a summary line: a run of consecutive layers as a range ``a:b`` (as
    :func:`~lensattr.layers.parse_layers` reads it), else comma-separated.

    Examples:
        >>> layers_text(range(30)), layers_text([1, 3]), layers_text([5])
        ('0:30', '1,3', '5')
    """
    layers = list(layers)
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}:{layers[-1] + 1}"
    return ",".join(map(str, layers))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:+.4f}"
    return "" if value is None else str(value)


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` as an aligned plain-text table of ``columns`` (numbers right-aligned).

    Examples:
        >>> print(text_table([{"id": "a", "score": 0.5}, {"id": "bb", "score": -1.0}],
        ...                  ["id", "score"]))
        id    score
        a   +0.5000
        bb  -1.0000
    """
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(line[i]) for line in cells)]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), int | float) for r in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(columns), *(line(c) for c in cells)])


def html_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], caption: str = "") -> str:
    """``rows`` as an HTML table of ``columns`` (every value escaped)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _strength(value: float, scale: float) -> float:
    return 0.0 if scale == 0 or not math.isfinite(value) else min(abs(value) / scale, 1.0)


def tokens_text(tokens: Sequence[str], values: Sequence[float], *, color: bool) -> str:
    """The tokens of a reply as one line of text, each highlighted by its value: with
    ``color``, ANSI backgrounds (red: pushes the score up, blue: down; stronger = larger);
    without, the strongest fifth of the tokens in ``[[ ]]`` (up) or ``(( ))`` (down).

    Examples:
        >>> tokens_text(["a", " b", " c", " d", " e"], [0.0, 2.0, 0.1, -3.0, 0.0], color=False)
        'a b c ((d)) e'
    """
    scale = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
    out = []
    if color:
        for tok, v in zip(tokens, values, strict=True):
            level = round(_strength(v, scale) * 4)  # 0..4 steps of one colour
            if level == 0:
                out.append(tok)
                continue
            # 256-colour palette: reds 224, 217, 210, 203 / blues 189, 153, 117, 81
            shade = (224, 217, 210, 203)[level - 1] if v > 0 else (189, 153, 117, 81)[level - 1]
            out.append(f"\x1b[48;5;{shade}m\x1b[30m{tok}\x1b[0m")
        return "".join(out)
    n_marked = max(1, len(tokens) // 5)
    strongest = sorted(range(len(tokens)), key=lambda i: -abs(values[i]))[:n_marked]
    marked = {i for i in strongest if _strength(values[i], scale) > 0}
    for i, tok in enumerate(tokens):
        if i not in marked:
            out.append(tok)
            continue
        lead = tok[: len(tok) - len(tok.lstrip())] if tok.strip() else ""
        core = tok[len(lead) :]
        out.append(f"{lead}[[{core}]]" if values[i] > 0 else f"{lead}(({core}))")
    return "".join(out)


def tokens_html(tokens: Sequence[str], values: Sequence[float]) -> str:
    """The tokens of a reply as HTML spans, each with a background by its value (red: pushes
    the score up, blue: down) and its value as a tooltip."""
    scale = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
    spans = []
    for tok, v in zip(tokens, values, strict=True):
        alpha = _strength(v, scale)
        rgb = "220,50,47" if v > 0 else "38,139,210"
        spans.append(
            f'<span title="{v:+.4g}" style="background: rgba({rgb},{alpha:.2f}); '
            f'white-space: pre-wrap">{html.escape(tok)}</span>'
        )
    return '<div style="font-family: monospace; line-height: 1.6">' + "".join(spans) + "</div>"
