"""Host memory that a large operation freed, handed back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util


def return_freed_memory() -> None:
    """Hand freed heap memory back to the operating system (glibc's ``malloc_trim``; elsewhere nothing).

    Loading a checkpoint frees whole checkpoints' worth of temporaries (fused copies of per-expert
    tensors, experts moved to stores or streamed past), and a large HTTP request leaves its body, the
    parsed text and the tokenizer's buffers. glibc keeps such freed blocks in the process (above the
    first large free its mmap threshold rises, so later large blocks come from the heap too), where
    they still count as resident memory: resident memory would stay where the largest load or request
    left it.
    """
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is not None:
        trim(0)
