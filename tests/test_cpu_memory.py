"""utils/cpu_memory: glibc keeps freed memory when asked, and the opt-out leaves it alone."""

import subprocess
import sys

import pytest

CHECK = """
import ctypes, ctypes.util, os, sys
from hirespath.utils.cpu_memory import keep_freed_memory
state = keep_freed_memory()
assert keep_freed_memory() is state  # once per process
libc = ctypes.CDLL(ctypes.util.find_library("c"))
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
before = libc.mallinfo2().hblks
buf = ctypes.create_string_buffer(64 << 20)  # 64 MB: over glibc's largest mmap threshold
print(int(state), libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
@pytest.mark.parametrize("choice, kept", [("keep", True), ("system", False)])
def test_large_blocks_come_from_the_heap_when_kept(choice, kept):
    import os

    env = {**os.environ, "HIRESPATH_CPU_MALLOC": choice}
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, check=True)
    state, new_mmapped_blocks = map(int, out.stdout.split())
    assert state == int(kept)
    # kept: the 64 MB block lives in the heap (no mmapped block); glibc's default serves it by mmap
    assert (new_mmapped_blocks == 0) == kept
