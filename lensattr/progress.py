"""Progress of long work: a bar where one can be drawn, a line per stage everywhere else.

- On a terminal: a ``tqdm`` bar on stderr.
- In Jupyter with ``ipywidgets``: the notebook widget; without it, a plain text bar in the cell
  (instead of ``tqdm.auto``'s ``TqdmWarning`` and nothing).
- Anywhere else (a script whose stderr is a file or a pipe, CI, a job log): one line on stderr
  at most every :data:`LINE_EVERY` seconds and at the end, with the count, the rate and the ETA,
  e.g. ``lensattr caching: 120/264 (45%), 2.1 ex/s, ETA 1m09s``.

``progress=False`` silences it; ``TQDM_DISABLE=1`` too.

Examples:
    >>> with Progress(total=3, desc="demo", unit="ex", enabled=False) as p:
    ...     p.update(3)
    >>> p.n
    3
"""

import os
import sys
import time
from typing import Any

LINE_EVERY = 30.0
"""Seconds between two progress lines when no bar can be drawn."""


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    ip = getattr(shell, "get_ipython", lambda: None)() if shell else None
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def _has_widgets() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """A progress report over ``total`` units (see the module docstring for where it goes)."""

    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool | None = None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        off = enabled is False or (enabled is None and os.environ.get("TQDM_DISABLE") == "1")
        self._bar: Any = None
        self._lines = False
        if off:
            return
        if _in_notebook():
            if _has_widgets():
                from tqdm.notebook import tqdm
            else:
                from tqdm.std import tqdm  # type: ignore[assignment]
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stdout)
        elif sys.stderr.isatty() or enabled is True:
            from tqdm.std import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit)
        else:
            self._lines = True
        self._t0 = self._last = time.perf_counter()

    def update(self, k: int = 1) -> None:
        self.n += k
        if self._bar is not None:
            self._bar.update(k)
        elif self._lines:
            now = time.perf_counter()
            if now - self._last >= LINE_EVERY or self.n >= self.total:
                self._last = now
                self._line(now)

    def _line(self, now: float) -> None:
        rate = self.n / max(now - self._t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        pct = 100 * self.n / max(self.total, 1)
        tail = "done" if self.n >= self.total else f"ETA {_fmt(eta)}"
        print(
            f"lensattr {self.desc}: {self.n}/{self.total} ({pct:.0f}%), {rate:.2f} {self.unit}/s, "
            f"{tail}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
