"""Freed heap memory handed back to the operating system after a shard's build.

A gradient capture allocates its graph (about 1 MB per position for SmolLM2-135M) in tensors
of a few MB, which glibc serves from its heap; once freed, the heap keeps the pages, so the
process stayed at its largest batch's size for good (4.9 GB after a persona build whose live
tensors were 1.3 GB). ``malloc_trim`` returns the free pages. ``build_cache`` calls it once per
shard, not per batch: per batch it cost 6% of a 48-example build in page faults (the next batch
touches the returned pages again). A no-op off glibc.
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
