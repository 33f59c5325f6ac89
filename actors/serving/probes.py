"""Device probes: measure a device's memory, utilisation and temperature.

Three kinds behind one Protocol: NVML GPUs (`pynvml` from nvidia-ml-py), the host CPU with its RAM
as device memory, and simulated devices from config, which measure nothing and say so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from actors.serving.config import ResourcesConfig, SimulatedDevice
from actors.types import DeviceKind

log = logging.getLogger(__name__)
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class DeviceReading:
    """One measurement of a device; memory in MiB."""

    total_mb: float
    used_mb: float
    utilization_percent: float | None = None
    temperature_c: float | None = None

    @property
    def free_mb(self) -> float:
        return max(0.0, self.total_mb - self.used_mb)


class DeviceProbe(Protocol):
    """Measures one device."""

    name: str
    kind: DeviceKind
    index: int | None

    def read(self) -> DeviceReading:
        """Measure the device now."""


class NvmlProbe:
    """An NVIDIA GPU read through NVML."""

    kind: DeviceKind = "nvml"

    def __init__(self, nvml: Any, index: int) -> None:
        self._nvml = nvml
        self.index: int | None = index
        self._handle = nvml.nvmlDeviceGetHandleByIndex(index)
        raw_name = nvml.nvmlDeviceGetName(self._handle)
        model = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        self.name = f"cuda:{index}"
        self.model = model

    def read(self) -> DeviceReading:
        nvml = self._nvml
        mem = nvml.nvmlDeviceGetMemoryInfo(self._handle)
        util: float | None = None
        temp: float | None = None
        # Not every board reports utilisation or temperature (MIG slices, some datacentre parts).
        with contextlib.suppress(nvml.NVMLError):
            util = float(nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
        with contextlib.suppress(nvml.NVMLError):
            temp = float(nvml.nvmlDeviceGetTemperature(self._handle, nvml.NVML_TEMPERATURE_GPU))
        return DeviceReading(mem.total / MIB, mem.used / MIB, util, temp)

    def process_memory_mb(self, pid: int) -> float | None:
        """GPU memory the process `pid` holds on this device, or None if it holds none."""
        for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return float(proc.usedGpuMemory) / MIB
        return None


class CpuProbe:
    """The host CPU, with host RAM as the device memory (`MemAvailable` counts as free)."""

    kind: DeviceKind = "cpu"

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.name = "cpu"
        self.index: int | None = None
        self._proc = proc
        self._lock = threading.Lock()
        self._last_cpu = (0, 0)  # (idle, total) ticks: the first reading covers since boot
        self._last_percent: float | None = None

    def read(self) -> DeviceReading:
        info = _meminfo(self._proc / "meminfo")
        total = info["MemTotal"] / 1024
        available = info.get("MemAvailable", info["MemFree"]) / 1024
        return DeviceReading(total, total - available, self._utilization(), None)

    def _utilization(self) -> float | None:
        """Percent of CPU time busy since the previous reading (the first: since boot, so the
        gauge has a value from the node's start); two readings within one clock tick repeat
        the last figure."""
        fields = (self._proc / "stat").read_text().split("\n", 1)[0].split()[1:]
        ticks = [int(v) for v in fields]
        idle, total = ticks[3] + ticks[4], sum(ticks)
        with self._lock:
            last_idle, last_total = self._last_cpu
            if total > last_total:
                self._last_cpu = (idle, total)
                busy = 1 - (idle - last_idle) / (total - last_total)
                self._last_percent = round(100.0 * busy, 1)
            return self._last_percent


class SimulatedProbe:
    """A device that exists only in config: it measures nothing, so its ledger is all claims."""

    kind: DeviceKind = "simulated"

    def __init__(self, spec: SimulatedDevice) -> None:
        self.name = spec.name
        self.index: int | None = None
        self._total = float(spec.total_mb)

    def read(self) -> DeviceReading:
        return DeviceReading(self._total, 0.0, None, None)


_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / MIB


def process_rss_mb(pid: int, proc: Path = Path("/proc")) -> float | None:
    """Return the resident memory of process `pid` in MiB, or None once it has gone."""
    try:
        statm = (proc / str(pid) / "statm").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(statm.split()[1]) * _PAGE_MB


def _meminfo(path: Path) -> dict[str, int]:
    """Parse /proc/meminfo into kB values."""
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[key] = int(parts[0])
    return out


def discover(config: ResourcesConfig) -> Sequence[DeviceProbe]:
    """Find the devices the config asks for: NVML GPUs (auto), else the CPU, or simulated ones."""
    if config.devices == "simulated":
        log.warning("using %d SIMULATED device(s): no real accelerator", len(config.simulated))
        return [SimulatedProbe(spec) for spec in config.simulated]
    if config.devices == "auto":
        gpus = _nvml_probes()
        if gpus:
            return gpus
    return [CpuProbe()]


def _nvml_probes() -> list[DeviceProbe]:
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception as exc:  # NVMLError_LibraryNotFound, driver missing, no devices...
        log.info("NVML unavailable (%s): running on the CPU device", exc)
        return []
    return [NvmlProbe(pynvml, i) for i in range(count)]
