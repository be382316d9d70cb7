"""Keep freed tensor memory in the process instead of handing it back to the kernel each batch.

glibc's malloc serves a request above its mmap threshold (dynamic, at most 32 MB on 64-bit) with a
fresh mmap and unmaps it on free. A CPU forward pass allocates activations of hundreds of MB per
batch (EfficientNet-Lite0 at 128 px, batch 256: 400 MB for one feature map), so every batch maps
them again, and the kernel zeroes every page on its first touch: on `make demo` that was a quarter of
the CPU time spent in the kernel and 405 million minor page faults (docs/benchmarks.md, "Where the
demo's time goes"). Telling malloc to serve large blocks from its heap (M_MMAP_MAX = 0) and never to
trim the heap's top (M_TRIM_THRESHOLD) keeps those pages mapped and reused. The cost is that memory a
process has used stays with it until it exits, as with any caching allocator.

glibc reads its MALLOC_* variables only when a process starts, so the settings are made through
mallopt at start-up (the CLI's first act); forked workers (DataLoader, rendering pools) inherit them.
On another C library (musl, macOS) nothing is changed. CLIPCID_MALLOC=default leaves glibc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("clipcid")

# mallopt's parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
KEEP = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1}  # mallopt takes an int: the largest is 2 GB
PARAMETERS = {"M_TRIM_THRESHOLD": M_TRIM_THRESHOLD, "M_TOP_PAD": M_TOP_PAD, "M_MMAP_THRESHOLD": M_MMAP_THRESHOLD,
              "M_MMAP_MAX": M_MMAP_MAX}  # fmt: skip
ENV = "CLIPCID_MALLOC"

_applied: dict | None = None


def _glibc() -> tuple[ctypes.CDLL, str] | None:
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):  # not glibc
        return None
    version.restype = ctypes.c_char_p
    return libc, version().decode()


def set_malloc(settings: dict[str, int]) -> dict:
    """Apply mallopt settings by name; returns {"allocator": ..., "settings": {...}} of what took."""
    found = _glibc()
    if found is None:
        return {"allocator": "not glibc: left as it is", "settings": {}}
    libc, version = found
    took = {}
    for name, value in settings.items():
        if libc.mallopt(PARAMETERS[name], int(value)) == 1:  # mallopt returns 1 on success
            took[name] = int(value)
    return {"allocator": f"glibc {version}", "settings": took}


def keep_freed_memory() -> dict:
    """The start-up setting (once per process): large blocks from malloc's heap, its top never trimmed.
    Returns what was applied, for the log and run.json."""
    global _applied
    if _applied is None:
        if os.environ.get(ENV, "").lower() == "default":
            _applied = {"allocator": "left at its defaults", "settings": {}, "why": f"{ENV}=default"}
        else:
            _applied = set_malloc(KEEP)
        log.debug("allocator: %s", describe())
    return _applied


def release() -> None:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim), between stages: what one
    stage kept for its batches is not held through the next. No-op where settings were not changed."""
    found = _glibc()
    if found is not None and _applied and _applied["settings"]:
        found[0].malloc_trim(0)


def applied() -> dict | None:
    """What keep_freed_memory set in this process, or None when it has not run."""
    return _applied


def describe() -> str:
    if _applied is None:
        return "not configured"
    settings = ", ".join(f"{k}={v}" for k, v in _applied["settings"].items())
    return (
        f"{_applied['allocator']}"
        + (f" ({settings})" if settings else "")
        + (f", {_applied['why']}" if "why" in _applied else "")
    )
