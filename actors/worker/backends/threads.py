"""How many threads llama.cpp decodes with when nobody says: the physical cores, as llama.cpp does.

llama.cpp's own tools default to the physical cores this process may run on (`cpu_get_num_math`):
a hyperthread sibling adds no matmul throughput, and more threads than cores make ggml's
spin-waiting threads preempt each other, which costs far more than a thread less (on a 2-core
host, llama.cpp's context default of 4 threads decoded a ~50M model at under half llama-server's
speed; llama-cpp-python's default, half the logical CPUs, leaves a core idle where there is no
hyperthreading). Pure apart from `physical_cores`, which reads sysfs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

_TOPOLOGY = "/sys/devices/system/cpu/cpu{}/topology/thread_siblings_list"


def count_cores(cpus: Iterable[int], siblings_of: Callable[[int], str | None]) -> int:
    """Count the physical cores among `cpus`: CPUs sharing a sibling list are one core.

    A CPU whose siblings cannot be read counts as a core of its own.
    """
    cores: set[str] = set()
    for cpu in cpus:
        siblings = siblings_of(cpu)
        cores.add(siblings.strip() if siblings else f"cpu{cpu}")
    return max(1, len(cores))


def _read_siblings(cpu: int) -> str | None:
    try:
        return Path(_TOPOLOGY.format(cpu)).read_text()
    except OSError:
        return None


def physical_cores() -> int:
    """Return the physical cores this process may run on (its affinity mask, then sysfs)."""
    try:
        cpus: Iterable[int] = os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not Linux
        cpus = range(os.cpu_count() or 1)
    return count_cores(sorted(cpus), _read_siblings)
