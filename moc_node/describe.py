"""The documents a node answers with (health, device JSON, the one-member cluster view).

Pure functions of what the node read from its board and ledgers: no actor, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from actors.types import ComponentHealth, DeviceInfo, HealthReport, HealthStatus, ModelInfo


def health_report(
    devices: Sequence[DeviceInfo],
    models: Sequence[ModelInfo],
    *,
    store: str,
    ready: bool,
    draining: bool,
) -> HealthReport:
    """Rate each component; the node is as healthy as its worst one."""
    components: dict[str, ComponentHealth] = {}
    components["devices"] = ComponentHealth(
        "healthy" if devices else "unhealthy",
        ", ".join(f"{d.label}: {d.free_mb:.0f}/{d.total_mb:.0f} MiB free" for d in devices),
    )
    broken = [m.name for m in models if m.state == "failed" or m.breaker != "closed"]
    components["models"] = ComponentHealth(
        "degraded" if broken else "healthy",
        f"{sum(m.state == 'loaded' for m in models)} loaded"
        + (f"; failing: {', '.join(broken)}" if broken else ""),
    )
    components["state_store"] = ComponentHealth("healthy", store)
    components["node"] = ComponentHealth(
        "degraded" if draining else "healthy",
        "draining" if draining else ("ready" if ready else "starting"),
    )
    worst: HealthStatus = "healthy"
    for component in components.values():
        if component.status == "unhealthy":
            worst = "unhealthy"
        elif component.status == "degraded" and worst == "healthy":
            worst = "degraded"
    return HealthReport(worst, components)


def device_json(d: DeviceInfo) -> dict[str, Any]:
    """One device as /status lists it."""
    return {
        "name": d.label,
        "kind": d.kind,
        "simulated": d.simulated,
        "total_mb": d.total_mb,
        "used_mb": d.used_mb,
        "claimed_mb": d.claimed_mb,
        "free_mb": d.free_mb,
        "utilization_percent": d.utilization_percent,
        "temperature_c": d.temperature_c,
    }


def solo_view(
    name: str, devices: Sequence[DeviceInfo], models: Sequence[ModelInfo], *, draining: bool
) -> dict[str, Any]:
    """The /cluster document of a node without a cluster: itself, the only member."""
    me = {
        "name": name,
        "state": "leaving" if draining else "alive",
        "incarnation": 0,
        "devices": [device_json(d) for d in devices],
        "models": [
            {"name": m.name, "state": m.state, "in_flight": m.in_flight, "queued": m.queued}
            for m in models
            if m.state in ("loaded", "loading")
        ],
    }
    holders = {m.name: [name] for m in models if m.state == "loaded"}
    return {
        "enabled": False,
        "self": name,
        "primary": None,
        "term": 0,
        "members": [me],
        "models": holders,
    }


__all__ = ["device_json", "health_report", "solo_view"]
