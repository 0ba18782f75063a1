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


RELEASE = """
import os
import torch
from hirespath.utils.cpu_memory import keep_freed_memory, release_freed_memory
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
assert keep_freed_memory()
start = rss_mb()
x = torch.ones(256 << 18)  # 256 MB, touched
del x
kept = rss_mb()
assert release_freed_memory()
print(round(kept - start), round(rss_mb() - start))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_kept_memory_goes_back_to_the_os_on_release():
    import os

    env = {**os.environ, "HIRESPATH_CPU_MALLOC": "keep"}
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, env=env, check=True)
    kept, released = map(int, out.stdout.split())
    assert kept > 200 and released < 50  # MB above the start: held while kept, returned on release
