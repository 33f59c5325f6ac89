"""Watching a model worker's memory between requests: grown past what was reported, or runaway.

The worker reports its memory after each request, but a worker can grow during one (a long
prompt touching compute buffers reserved at load, or a library sizing something by the model's
metadata), outside the ledger until the request ends. The ModelActor measures the process every
`poll_s` and asks `judge_memory` what to do: report growth (the manager raises the claim) or,
past `limit_mb`, kill the worker. Pure: the measurements come in as numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

GROWTH_FRACTION = 0.02
"""Growth under this fraction of the last report is not reported (the lane uses the same)."""


@dataclass(frozen=True, slots=True)
class MemoryWatch:
    """How a ModelActor watches its worker; production values come from [resources]."""

    poll_s: float = 5.0
    """Seconds between measurements (`gpu_poll_interval`)."""
    limit_mb: float = 0.0
    """The worker process's most memory on its device (`worker_memory_limit_mb`); 0 = none."""


@dataclass(frozen=True, slots=True)
class MemoryVerdict:
    """What a measurement calls for: nothing, a new working size to report, or a kill."""

    grown_mb: float | None = None
    kill: bool = False


def model_mb(process_mb: float, offset_mb: float) -> float:
    """Return the model's share of the process: what it holds beyond the bare worker."""
    return max(0.0, process_mb - offset_mb)


def judge_memory(
    process_mb: float, offset_mb: float, reported_mb: float, limit_mb: float
) -> MemoryVerdict:
    """Decide on one measurement of the worker process (`process_mb`, all it holds).

    `offset_mb` is what the process held beyond the model at load, `reported_mb` the model's
    size last reported to the manager, `limit_mb` the per-worker limit (0: none).
    """
    if limit_mb > 0 and process_mb > limit_mb:
        return MemoryVerdict(kill=True)
    size = model_mb(process_mb, offset_mb)
    if size > reported_mb * (1 + GROWTH_FRACTION):
        return MemoryVerdict(grown_mb=size)
    return MemoryVerdict()
