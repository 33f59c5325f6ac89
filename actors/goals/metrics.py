"""Prometheus metrics of goals (the first three names are a contract: legacy dashboards)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Goals run for minutes to days: training dominates.
DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 21600, 86400)

goals_active_total = Gauge("moc_goals_active_total", "Goals whose plans are running now")
goals_pending = Gauge("moc_goals_pending", "Goals waiting for a free slot (max_active_goals)")
goals_completed_total = Counter("moc_goals_completed_total", "Goals whose plans ran to the end")
goals_failed_total = Counter("moc_goals_failed_total", "Goals ended by a failed step")
goals_cancelled_total = Counter("moc_goals_cancelled_total", "Goals cancelled by a client")
goals_execution_duration_seconds = Histogram(
    "moc_goals_execution_duration_seconds",
    "Time from a goal's first step to its end, by outcome",
    ["outcome"],
    buckets=DURATION_BUCKETS,
)
goal_steps_total = Counter(
    "moc_goal_steps_total", "Goal steps finished, by kind and outcome", ["kind", "outcome"]
)
goals_pruned_total = Counter(
    "moc_goals_pruned_total", "Finished goals deleted to keep goals.max_stored_goals"
)
goals_refused_total = Counter(
    "moc_goals_refused_total",
    "New goals refused by a limit (too_many_goals: 429, goal_store_full: 507)",
    ["reason"],
)
