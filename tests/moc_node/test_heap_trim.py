"""The heap trimmer, in a process of its own: freed heap pages go back to the OS."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What the fuzz bench saw in the node: a freed large buffer raises glibc's mmap threshold, later
# large buffers come from the heap, and freeing them leaves holes under live chunks.
FRAGMENT_THEN_TRIM = textwrap.dedent(
    """
    import sys
    from moc_node.heap_trim import heap_trimmer

    def rss_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

    trim = heap_trimmer()
    assert trim is not None, "glibc has malloc_trim"
    big = bytearray(8 << 20)
    del big
    buffers, live = [], []
    for _ in range(64):
        buffers.append(bytearray(256 << 10))
        live.append(bytes(600))  # past pymalloc's 512 bytes: a small chunk above each buffer
    del buffers
    before = rss_kb()
    trim()
    print(before - rss_kb())
    """
)


def test_the_trimmer_hands_freed_heap_pages_back_to_the_os() -> None:
    out = subprocess.run(
        [sys.executable, "-c", FRAGMENT_THEN_TRIM],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )
    returned_kb = int(out.stdout)
    assert returned_kb > 12 * 1024, f"{returned_kb} KiB returned of the 16 MiB freed"
