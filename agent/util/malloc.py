"""glibc's malloc set for a process that hands camera frames and tensors between threads.

glibc serves a large block with mmap only below a threshold it raises by itself after the first such
block is freed (up to 32 MiB), and each thread allocates from arenas of its own: a 3.7 MiB input tensor
freed by one pipeline thread then stays in that thread's arena, and four camera pipelines hold several
of them each. A fixed threshold (which also stops the raising) gives every block of 1 MiB or more back
to the kernel when it is freed; measured on four PP-OCR camera pipelines, peak RSS went from 343 to 298-316
MiB. Frames below the threshold (640x480 BGR is 0.9 MiB) stay on the heap, where they are reused.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
LARGE_BLOCK = 1 << 20


def _libc_function(name: str) -> Any:
    """A function of glibc's malloc (a ctypes function), or None where the C library is not glibc (musl,
    macOS). Looked up among the symbols the process has loaded (the interpreter links the C library):
    `ctypes.util.find_library` would run `ldconfig -p` in a child process at every start and every trim."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def return_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Blocks of `threshold` bytes or more come from mmap and go back to the kernel when freed; False
    where the C library is not glibc (musl, macOS), which is left as it is."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    log.debug("malloc: blocks of %d bytes or more are returned when freed: %s", threshold, done)
    return done


def give_back_freed() -> bool:
    """Free heap pages go back to the kernel (`malloc_trim`): after a session is dropped, its small blocks
    freed all over the heap would otherwise stay in the process's RSS (an interim CPU session left 17 MiB
    of a PP-OCR detector behind; trimmed, none). False where the C library is not glibc."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
