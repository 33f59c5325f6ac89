"""The documents a node answers with: health, device JSON, the one-member cluster view (pure)."""

from __future__ import annotations

import pytest

from actors.types import DeviceInfo, HealthStatus, ModelInfo
from moc_node.describe import device_json, health_report, solo_view

GPU = DeviceInfo("cuda:0", "nvml", 8192.0, 1024.0, 2048.0, 6144.0, 12.0, 55.0)


def model(name: str, state: str = "loaded", breaker: str = "closed") -> ModelInfo:
    return ModelInfo(name, "gguf", f"/m/{name}.gguf", state, breaker=breaker)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("devices", "models", "draining", "overall", "failing"),
    [
        ([GPU], [model("a")], False, "healthy", {}),
        ([], [model("a")], False, "unhealthy", {"devices": "unhealthy"}),
        ([GPU], [model("a", "failed")], False, "degraded", {"models": "degraded"}),
        ([GPU], [model("a", breaker="open")], False, "degraded", {"models": "degraded"}),
        ([GPU], [], True, "degraded", {"node": "degraded"}),
        ([], [model("a", "failed")], True, "unhealthy", {"devices": "unhealthy"}),
    ],
    ids=[
        "all-well",
        "no-device-is-unhealthy",
        "a-failed-model-degrades",
        "an-open-breaker-degrades",
        "draining-degrades",
        "the-worst-component-wins",
    ],
)
def test_a_node_is_as_healthy_as_its_worst_component(
    devices: list[DeviceInfo],
    models: list[ModelInfo],
    draining: bool,
    overall: HealthStatus,
    failing: dict[str, str],
) -> None:
    report = health_report(devices, models, store="/s.db", ready=True, draining=draining)
    assert report.status == overall
    for name, status in failing.items():
        assert report.components[name].status == status


def test_the_models_component_counts_loaded_models_and_names_the_failing_ones() -> None:
    models = [model("a"), model("b"), model("c", "failed"), model("d", "loading")]
    report = health_report([GPU], models, store="/s.db", ready=True, draining=False)
    assert report.components["models"].detail == "2 loaded; failing: c"


def test_the_node_component_says_starting_ready_or_draining() -> None:
    def said(ready: bool, draining: bool) -> str:
        report = health_report([GPU], [], store="/s.db", ready=ready, draining=draining)
        return report.components["node"].detail

    assert [said(False, False), said(True, False), said(True, True)] == [
        "starting",
        "ready",
        "draining",
    ]


def test_a_device_is_listed_by_its_label_with_its_memory() -> None:
    doc = device_json(GPU)
    assert doc["name"] == GPU.label
    assert (doc["total_mb"], doc["free_mb"], doc["claimed_mb"]) == (8192.0, 6144.0, 2048.0)
    assert doc["simulated"] is False


def test_a_node_without_a_cluster_is_the_only_member_and_holds_its_loaded_models() -> None:
    models = [model("a"), model("b", "loading"), model("c", "unloaded")]
    view = solo_view("n1", [GPU], models, draining=False)
    assert view["enabled"] is False
    assert view["primary"] is None
    assert [m["name"] for m in view["members"]] == ["n1"]
    assert [m["name"] for m in view["members"][0]["models"]] == ["a", "b"]  # loaded or loading
    assert view["models"] == {"a": ["n1"]}  # only a loaded model has a holder


def test_a_draining_node_without_a_cluster_says_it_is_leaving() -> None:
    assert solo_view("n1", [], [], draining=True)["members"][0]["state"] == "leaving"
