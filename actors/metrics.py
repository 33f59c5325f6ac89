"""Prometheus metrics of the actors package (names are a contract: legacy dashboards query them).

Devices are labelled with their listing name, so a simulated device shows "sim0 (simulated)".
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

gpu_total_memory_mb = Gauge("moc_gpu_total_memory_mb", "Device memory (MiB)", ["device", "kind"])
gpu_used_memory_mb = Gauge(
    "moc_gpu_used_memory_mb", "Measured used memory (MiB)", ["device", "kind"]
)
gpu_claimed_memory_mb = Gauge(
    "moc_gpu_claimed_memory_mb", "Memory claimed by loaded models (MiB)", ["device", "kind"]
)
gpu_utilization_percent = Gauge(
    "moc_gpu_utilization_percent", "Device utilisation (%)", ["device", "kind"]
)
gpu_temperature_celsius = Gauge(
    "moc_gpu_temperature_celsius", "Device temperature (C)", ["device", "kind"]
)
gpu_probe_errors_total = Counter(
    "moc_gpu_probe_errors_total", "Failed device measurements", ["device"]
)

models_loaded_total = Gauge("moc_models_loaded_total", "Models loaded now")
model_load_duration_seconds = Histogram(
    "moc_model_load_duration_seconds", "Time to load a model", ["model"], buckets=LATENCY_BUCKETS
)
model_memory_usage_mb = Gauge(
    "moc_model_memory_usage_mb", "Measured memory of a loaded model (MiB)", ["model", "device"]
)
model_memory_estimate_mb = Gauge(
    "moc_model_memory_estimate_mb", "Estimated memory of a model before load (MiB)", ["model"]
)
model_evictions_total = Counter(
    "moc_model_evictions_total", "Models unloaded to make room or on keep_alive", ["reason"]
)

inference_requests_total = Counter(
    "moc_inference_requests_total", "Inference requests by outcome", ["model", "outcome"]
)
inference_latency_seconds = Histogram(
    "moc_inference_latency_seconds", "Inference latency", ["model"], buckets=LATENCY_BUCKETS
)
inference_tokens_generated_total = Counter(
    "moc_inference_tokens_generated_total", "Tokens generated", ["model"]
)
inference_errors_total = Counter(
    "moc_inference_errors_total", "Inference errors by kind", ["model", "error"]
)

circuit_breaker_state = Gauge(
    "moc_circuit_breaker_state", "Breaker state: 0 closed, 1 open, 2 half-open", ["model"]
)
circuit_breaker_failures_total = Counter(
    "moc_circuit_breaker_failures_total", "Worker failures counted by the breaker", ["model"]
)
bulkhead_active_requests = Gauge(
    "moc_bulkhead_active_requests", "Requests admitted to a model", ["model"]
)
bulkhead_queued_requests = Gauge(
    "moc_bulkhead_queued_requests", "Requests waiting for a model to load", ["model"]
)
bulkhead_rejected_total = Counter(
    "moc_bulkhead_rejected_total", "Requests refused as overloaded", ["model"]
)
