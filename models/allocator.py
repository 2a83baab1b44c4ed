"""Keep freed memory inside the process, so CPU forwards stop paying the kernel for fresh pages.

glibc serves every allocation above its mmap threshold (a few MB at most) with a fresh mmap and gives it back
with munmap on free, and trims the heap's top once it is free. A forward allocates hundreds of MB of such
tensors (a 64 x 32-token batch of SmolLM2-135M: ~400 MB of logits alone), so each forward touches the pages
anew: about 450k minor page faults, ~0.5 s of a 3.7 s forward on this project's 2-core machine, varying run to
run. With mmap off and trimming off, freed blocks are reused and a repeated forward faults no page at all
(measured: 3.21 s median, 3.20-3.23 s over 6 forwards, vs 3.74 s, 3.69-3.88 s). The price: the process keeps
its peak heap until it exits, which suits a CLI run or a benchmark, not a long-lived service, so library code
never calls this; the CLI's one-job commands and the benchmarks do (``BORAHUB_SYSTEM_MALLOC=1`` opts out), `serve`
does not (measured no faster with it: hub/cli.py ``one_job``).
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h
applied = False  # whether this process retains freed memory (set by retain_freed_memory)


def retain_freed_memory() -> bool:
    """Switch glibc's malloc to reuse freed memory (no mmap for large blocks, no trimming). Returns whether it
    applied: False on a non-glibc C library or when BORAHUB_SYSTEM_MALLOC=1 asks for the default behaviour."""
    if os.environ.get("BORAHUB_SYSTEM_MALLOC", "") not in ("", "0"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc's soname; no library search at start-up
    except (OSError, AttributeError, TypeError):
        return False  # not glibc (musl, macOS, Windows): their allocators are left as they are
    global applied
    applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return applied
