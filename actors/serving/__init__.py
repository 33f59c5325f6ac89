"""Serving: the manager, model and GPU actors, ledger, placement, probes, memory estimates,
resilience, the lane to a worker, the state file, and the [resources]/[models]/[resilience] config.

May import the worker room and the shared top modules of `actors`.
"""
