"""lora.runtime.malloc: glibc keeps freed memory, so memory freed and allocated again costs no page faults."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# 64 MiB: above glibc's largest mmap threshold (32 MiB), so by default every such block is mmapped
# when allocated and unmapped when freed: 16384 fresh 4 KiB pages, each a minor fault, every time.
CHILD = """
import resource, sys
import torch
from lora.runtime.malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()       # idempotent
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    torch.ones(2**24).sum()                                   # 64 MiB written, read and freed
f0 = faults()
for _ in range(5):
    torch.ones(2**24).sum()
print(faults() - f0)
"""


def faults_of_five_64mib_blocks(mode: str) -> int:
    r = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, cwd=ROOT, check=True)
    return int(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_freed_memory_is_reused_without_page_faults():
    pages = 5 * 2**26 // 4096
    assert faults_of_five_64mib_blocks("default") > 0.9 * pages    # glibc's default: fresh pages each time
    assert faults_of_five_64mib_blocks("keep") < 0.02 * pages      # kept: the same warm pages again
