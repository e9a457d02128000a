"""Host memory a training step frees goes back to the operating system.

glibc's malloc serves a request of at least its mmap threshold with a mapping of its own,
unmapped when freed; smaller requests come from its heaps, which keep freed memory for
reuse and, fragmented, rarely give it back. The threshold starts at 128 KiB and moves: each
time a mapped block is freed, the threshold rises to that block's size (up to 32 MiB). A
step on the CPU frees activations of a few MiB after every micro-batch, so from the first
one on they come from the heaps, and the process grows step after step: a default LoRA step
of SmolLM2-135M in bf16 peaked at 3.8 GiB, against 2.6 GiB with the threshold held at
128 KiB (docs/benchmarks.md). Setting the threshold (mallopt) holds it where it is set.
Each mapped block is then new memory the kernel must fault in and zero, every micro-batch:
the same step ran at half the tokens/s (at 4 MiB: 3.4 GiB, 13 % slower). So it is asked for
(`training.mmap_threshold_kib`), never the default.

It is a setting of the whole process, kept after training returns; only glibc has it
(elsewhere, or with another allocator preloaded, nothing is done and it says so).
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>


def hold_mmap_threshold(kib: int = 128) -> str | None:
    """Hold glibc's mmap threshold at `kib` KiB (128: its initial value); None when done,
    else why not."""
    if not sys.platform.startswith("linux"):
        return f"not on Linux ({sys.platform})"
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return "the C library is not glibc"
    gnu_get_libc_version.restype = ctypes.c_char_p
    if mallopt(M_MMAP_THRESHOLD, kib * 1024) != 1:
        return f"glibc {gnu_get_libc_version().decode()} refused mallopt(M_MMAP_THRESHOLD)"
    return None
