"""What the worker process measures of itself: its RSS, and through NVML its GPU memory;
and how much of its memory is in transparent huge pages.

Measured, not estimated: the worker reports its memory in Loaded and in every Done, and the
node claims and watches memory from them; the huge pages go to its log.
"""

from __future__ import annotations

import os

_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / (1024.0 * 1024.0)


_statm: tuple[int, int] | None = None  # (pid, descriptor of /proc/self/statm), opened once


def huge_pages_mb() -> float:
    """Return how much of this process's memory is in transparent huge pages, in MiB (0 where
    the kernel does not say: no /proc/self/smaps_rollup)."""
    try:
        with open("/proc/self/smaps_rollup", encoding="ascii") as rollup:
            for line in rollup:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def rss_mb() -> float:
    """Return this process's resident set size in MiB.

    Read from /proc/self/statm (one short line, regenerated at each read from offset 0) rather
    than /proc/self/status, and through a descriptor kept open: it is read after every request,
    where parsing the longer file was a tenth of a one-token request's time and opening and
    closing the file another few percent.
    """
    global _statm
    pid = os.getpid()
    if _statm is None or _statm[0] != pid:  # a forked child must read its own file
        _statm = (pid, os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC))
    return int(os.pread(_statm[1], 128, 0).split()[1]) * _PAGE_MB


def nvml_process_mb(device_index: int, pid: int) -> float | None:
    """Return the GPU memory `pid` holds on the device, via NVML; None if NVML cannot say."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return float(proc.usedGpuMemory) / (1024.0 * 1024.0)
        return None  # in another pid namespace NVML reports host pids: the caller falls back
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def nvml_used_mb(device_index: int) -> float | None:
    """Return the memory in use on the whole device, via NVML; None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        return float(pynvml.nvmlDeviceGetMemoryInfo(handle).used) / (1024.0 * 1024.0)
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()
