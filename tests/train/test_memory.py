"""retain_freed_memory: freed buffers are reused without page faults (glibc Linux only).

Each case runs in its own interpreter, since the setting is process-wide: allocate, fill and free a
64 MiB tensor 12 times, then count the minor page faults of doing it 3 more times, as every training
step after the first few does. The warm-up is long because the heap needs several rounds to reach its
steady state: each 64-byte-aligned request is a little larger than the hole the previous one left, so
the first 6–7 rounds extend the heap (the fragmentation that raises the peak memory, docs/performance.md).
"""

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from metasam.train.memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
for _ in range(12):
    torch.empty(2**24).fill_(1.0)  # 64 MiB, freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    torch.empty(2**24).fill_(1.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(mode: str, **env: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0] == "True", int(out[1])


glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"),
                           reason="retain_freed_memory sets glibc's mallopt; this C library is not glibc")


@glibc
def test_a_freed_buffer_is_reused_without_page_faults():
    applied, retained = probe("retain")
    assert applied
    _, default = probe("default")
    assert default >= 3 * 16  # glibc unmapped each block: the next one faults its pages in again (4 KiB or 2 MiB each)
    assert retained <= 12, f"{retained} page faults for three 64 MiB blocks that should have reused the heap"


@glibc
def test_the_opt_out_leaves_the_allocator_alone():
    applied, faults = probe("retain", METASAM_RETAIN_FREED_MEMORY="0")
    assert not applied and faults >= 3 * 16
