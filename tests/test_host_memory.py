"""glibc's mmap threshold is held where training sets it: a block freed by a step no longer
raises it, so later blocks of that size are mapped (and unmapped when freed, their memory
back to the OS) instead of being carved from heaps that keep it. Each case runs in a fresh
process: the setting is the process's."""

import subprocess
import sys

import pytest

from sftforge.training import host_memory

PROBE = """
import ctypes, runpy, sys
hold_mmap_threshold = runpy.run_path(sys.argv[2])["hold_mmap_threshold"]  # not all of sftforge

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "hold":
    assert hold_mmap_threshold() is None
libc.free(libc.malloc(8 << 20))  # like a step's activations: mapped, then freed
before = libc.mallinfo2().hblkhd
block = libc.malloc(1 << 20)
mapped = libc.mallinfo2().hblkhd - before >= 1 << 20
libc.free(block)
print("mapped" if mapped else "heap")
"""


def where_a_block_goes_after_a_larger_one_was_freed(mode: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode, host_memory.__file__],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's setting")
def test_held_threshold_maps_blocks_that_glibcs_moving_one_would_keep_in_its_heaps():
    assert where_a_block_goes_after_a_larger_one_was_freed("moving") == "heap"
    assert where_a_block_goes_after_a_larger_one_was_freed("hold") == "mapped"
