"""Prometheus metrics of learning jobs (names are a contract: legacy dashboards query them)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)

jobs_total = Counter("moc_learning_jobs_total", "Learning jobs submitted", ["job_type"])
jobs_completed_total = Counter(
    "moc_learning_jobs_completed_total", "Learning jobs that completed", ["job_type"]
)
jobs_failed_total = Counter(
    "moc_learning_jobs_failed_total", "Learning jobs that failed", ["job_type"]
)
jobs_cancelled_total = Counter(
    "moc_learning_jobs_cancelled_total", "Learning jobs cancelled", ["job_type"]
)
job_duration_seconds = Histogram(
    "moc_learning_job_duration_seconds",
    "Running time of finished learning jobs",
    ["job_type"],
    buckets=JOB_BUCKETS,
)
jobs_running = Gauge("moc_learning_jobs_running", "Learning jobs running now")
jobs_queued = Gauge("moc_learning_jobs_queued", "Learning jobs waiting to run")
tokens_trained_total = Counter(
    "moc_learning_tokens_trained_total", "Tokens of training data processed", ["job_type"]
)
