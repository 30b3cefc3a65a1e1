"""Freed heap memory handed back to the operating system between batches.

A gradient capture allocates its graph (about 1 MB per position for SmolLM2-135M) in tensors
of a few MB, which glibc serves from its heap; once freed, the heap keeps the pages, so the
process stayed at its largest batch's size for good (4.9 GB after a persona build whose live
tensors were 1.3 GB) and the holes raised the next batch's peak. ``malloc_trim`` returns the
free pages. Called once per batch (well under a millisecond); a no-op off glibc.
"""

import ctypes
import ctypes.util
import sys
from functools import cache
from typing import Any


@cache
def _malloc_trim() -> Any:  # the C function, or None
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return None


def trim() -> None:
    """Return the heap's free pages to the operating system (glibc's ``malloc_trim(0)``).

    Examples:
        >>> trim()  # nothing to see: the process's resident size shrinks where it can
    """
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
