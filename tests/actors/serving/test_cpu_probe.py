"""The CPU device's probe over a fake /proc: memory from meminfo, utilisation from stat deltas."""

from __future__ import annotations

from pathlib import Path

from actors.serving.probes import CpuProbe

MEMINFO = "MemTotal:       4096000 kB\nMemFree:         100000 kB\nMemAvailable:   1024000 kB\n"


def write_stat(proc: Path, busy: int, idle: int) -> None:
    # cpu user nice system idle iowait irq softirq: idle + iowait is idle time
    (proc / "stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0\ncpu0 0 0 0 0 0 0 0\n")


def test_utilisation_has_a_value_from_the_first_reading_then_follows_each_interval(
    tmp_path: Path,
) -> None:
    (tmp_path / "meminfo").write_text(MEMINFO)
    write_stat(tmp_path, busy=250, idle=750)
    probe = CpuProbe(tmp_path)
    first = probe.read()
    assert first.utilization_percent == 25.0  # since boot: a value at once, for the gauge
    assert (first.total_mb, first.used_mb) == (4000.0, 3000.0)
    write_stat(tmp_path, busy=340, idle=760)  # 90 busy of the 100 ticks since
    assert probe.read().utilization_percent == 90.0
    assert probe.read().utilization_percent == 90.0  # within one tick: the last figure again
