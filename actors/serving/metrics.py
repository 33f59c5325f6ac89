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
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
"""Per-token times: a decode step is milliseconds on a GPU, tens of them on a small CPU."""

inference_time_to_first_token_seconds = Histogram(
    "moc_inference_time_to_first_token_seconds",
    "From the worker taking a request to its first token (queue for a slot and prompt included)",
    ["model"],
    buckets=TOKEN_BUCKETS + (30, 60),
)
inference_time_per_output_token_seconds = Histogram(
    "moc_inference_time_per_output_token_seconds",
    "Mean time between a request's output tokens after the first",
    ["model"],
    buckets=TOKEN_BUCKETS,
)
inference_prompt_tokens_total = Counter(
    "moc_inference_prompt_tokens_total", "Prompt tokens of finished requests", ["model"]
)
inference_prompt_tokens_reused_total = Counter(
    "moc_inference_prompt_tokens_reused_total",
    "Prompt tokens whose KV a slot already held (not decoded again)",
    ["model"],
)
model_slots = Gauge(
    "moc_model_slots", "Requests a loaded model decodes at once (its parallel slots)", ["model"]
)
model_slots_busy = Gauge("moc_model_slots_busy", "Slots serving a request now", ["model"])
model_queue_depth = Gauge(
    "moc_model_queue_depth", "Requests admitted to a model and waiting for a free slot", ["model"]
)
worker_memory_kills_total = Counter(
    "moc_worker_memory_kills_total",
    "Model workers killed for holding more memory than [resources] worker_memory_limit_mb",
    ["model"],
)

MODEL_METRICS = (
    model_load_duration_seconds,
    model_memory_usage_mb,
    model_memory_estimate_mb,
    inference_requests_total,
    inference_latency_seconds,
    inference_tokens_generated_total,
    inference_errors_total,
    circuit_breaker_state,
    circuit_breaker_failures_total,
    bulkhead_active_requests,
    bulkhead_queued_requests,
    bulkhead_rejected_total,
    worker_memory_kills_total,
    inference_time_to_first_token_seconds,
    inference_time_per_output_token_seconds,
    inference_prompt_tokens_total,
    inference_prompt_tokens_reused_total,
    model_slots,
    model_slots_busy,
    model_queue_depth,
)
"""Every metric with a `model` label: a model name lives on /metrics exactly while it is here."""


def forget_model(name: str) -> None:
    """Remove every series labelled with model `name` (the model is gone from this node).

    Called when the model's slot is dropped (unloaded, or failed to load, and not in the
    catalog): kept, each distinct name a client ever loaded would stay on every scrape (about
    50 series for a load, 25 for a failed one). Whatever still writes to a removed series
    must look its child up again (`labels()`), which brings the series back rather than
    writing to a child no scrape sees.
    """
    for metric in MODEL_METRICS:
        metric.remove_by_labels({"model": name})
