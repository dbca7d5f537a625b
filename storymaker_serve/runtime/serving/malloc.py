"""glibc malloc settings for the serving processes: large buffers reused, not mapped and faulted in again.

Every request moves multi-megabyte buffers through our processes: the 960x1280 frame (3.7 MB uint8, 14.7 MB as
float32), the image tokens, gRPC messages in the gateway and the client. glibc serves allocations above its mmap
threshold (128 KB at start, raised only by frees on the main arena) with fresh mmaps and trims freed heap tops
back to the kernel, so each such buffer is page-faulted and zeroed again on every request: in the gateway that was
about half of its CPU time (perf, 960x1280 frames). With the threshold at 32 MB and the trim threshold at 256 MB,
freed buffers are reused. Bigger buffers (CPU UNet activations at full size) are still mapped and returned.

`env()` is what the launcher gives tritonserver (and so the Python-backend stubs); `tune_this_process()` sets the
same values with mallopt in a running process (the launcher, whose gateway forwards the messages; StoryMakerClient).
An operator's own MALLOC_* variables win; STORYMAKER_MALLOC_TUNING=0 turns both off.
"""
from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3          # mallopt parameters (malloc.h)
VARS = {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "MALLOC_TRIM_THRESHOLD_": TRIM_THRESHOLD}


def enabled(environ=os.environ) -> bool:
    return environ.get("STORYMAKER_MALLOC_TUNING", "1") != "0"


def env(environ=os.environ) -> dict[str, str]:
    """The MALLOC_* variables to add for a child process (none the operator set, none when turned off)."""
    if not enabled(environ):
        return {}
    return {k: str(v) for k, v in VARS.items() if k not in environ}


def tune_this_process(environ=os.environ) -> bool:
    """mallopt in this process (glibc only); False where turned off, set by the operator or not glibc."""
    if not enabled(environ) or any(k in environ for k in VARS):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                           TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
