"""Allocator settings that keep freed memory in the process, for long runs on the CPU.

glibc's ``malloc`` serves every block above its mmap threshold (32 MiB at most) with a fresh
``mmap`` and gives it back to the kernel on ``free``. PyTorch's CPU allocator calls ``malloc``
for each tensor, so every large tensor of a step starts on untouched pages, and the kernel
zero-fills each 4 KiB page on first touch. A SmolLM2 training step allocates several such
tensors: its logits alone take 800 tokens x 49,152 vocabulary entries, 79 MB in bfloat16 and
157 MB in float32. Serving them from the heap, and never trimming the heap, lets later steps
reuse the same pages.

On 2 cores of an AMD EPYC (AVX512-BF16), the unembedding product of one demo batch (800 x 576
by 576 x 49,152 in bfloat16) took 153 ms with glibc's defaults and 114 ms with these settings.
In one demo run before and two after, on that machine, the clean model's evaluation took
20.5 s against 18.3 and 20.4 s, and that of the integrated-gradients set 190 s against 168 and
174 s.

The cost is memory: the main heap shrinks only when more than 2 GiB is free at its top, so the
process keeps most of its peak resident size until it exits, and freed blocks can fragment
the heap. The settings cover the main thread's heap (glibc's main arena), where the
``tl-privacy`` command allocates. Large blocks that other threads allocate and free still go
back to the kernel (seen with glibc 2.36). The ``tl-privacy`` command applies the
settings at start, unless ``TL_PRIVACY_KEEP_FREED_MEMORY=0`` is set in the environment; a
notebook or script can call :func:`keep_freed_memory` itself.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys

logger = logging.getLogger("tl_privacy")

# Parameter numbers of mallopt(3), from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

# mallopt takes a C int, so the heap is still trimmed when more than 2 GiB is free at its top.
_NEVER_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` serve large blocks from the main heap and keep freed memory there.

    Sets ``M_MMAP_MAX`` to 0 (no block gets its own ``mmap``) and ``M_TRIM_THRESHOLD`` to the
    largest C int (up to 2 GiB of freed memory stays in the process), from the next
    allocation on. Blocks of threads other than the main thread are not covered (see the
    module's documentation). The environment variables ``MALLOC_MMAP_MAX_=0`` and
    ``MALLOC_TRIM_THRESHOLD_`` have the same effect when set before Python starts.

    Returns:
        True when both settings took effect; False on other platforms and C libraries
        (macOS, Windows, musl), where nothing is changed.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success and 0 on error.
    applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    if not applied:
        logger.debug(
            "mallopt failed to set M_MMAP_MAX or M_TRIM_THRESHOLD, so glibc's defaults remain"
        )
    return applied
