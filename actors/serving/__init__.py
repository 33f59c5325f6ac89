"""Serving: which models are loaded where, and the path from the event loop to each.

The ModelManager (manager) keeps one Slot per model (slot) and publishes it on the ModelBoard
(board); every decision is a pure function: placement, eviction and expiry (placement), what a
load request becomes (entry), the context a model may have (context), its memory (estimate,
memory_watch). A ModelActor per loaded model (model) supervises its worker; its ModelLane (lane)
carries requests on the event loop behind the breaker and bulkhead (resilience). A GPUActor per
device (gpu) measures it (probes) into its Ledger (ledger). The state file (store), the
[resources]/[models]/[resilience] config (config) and the metrics (metrics) complete the room.

May import the worker room and the shared top modules of `actors`.
"""
