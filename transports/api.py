"""The node as the transports see it.

Transports depend on this Protocol, never on `moc_node`; the Node facade implements it and is
handed in at wiring time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from actors.types import (
    DeviceInfo,
    EmbedRequest,
    EmbedResult,
    HealthReport,
    InferRequest,
    InferResult,
    LoadRequest,
    ModelInfo,
    TokenChunk,
)


class NodeAPI(Protocol):
    """Everything a client can ask of one node. Errors are `actors.errors.MocError` subclasses."""

    async def load(self, req: LoadRequest) -> ModelInfo:
        """Load a model (catalog name or allowed path); raise ModelAlreadyLoaded if loaded."""

    async def unload(self, name: str) -> ModelInfo:
        """Unload a loaded model; raise ModelNotLoaded if it is not."""

    def models(self) -> list[ModelInfo]:
        """List the catalog and loaded models with their state."""

    def devices(self) -> list[DeviceInfo]:
        """List the devices with the ledger's view of their memory."""

    async def infer(self, req: InferRequest) -> InferResult:
        """Run one request to the end; loads a cold catalog model first."""

    def infer_stream(self, req: InferRequest) -> AsyncIterator[TokenChunk | InferResult]:
        """Yield text pieces then one InferResult; closing the iterator cancels generation."""

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        """Embed each input with a GGUF model: one L2-normalised float32 vector per input."""

    def health(self) -> HealthReport:
        """Report per-component health."""

    def is_ready(self) -> bool:
        """True once models are restored (and, with a cluster, the cluster is joined)."""

    def status(self) -> dict[str, Any]:
        """Describe the node (name, version, uptime, devices, models) as JSON-ready data."""

    async def list_jobs(self, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """List learning jobs, oldest first: at most `limit` (None: all) from `offset`."""

    async def create_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Queue a learning job; return it (with its `job_id`)."""

    async def get_job(self, job_id: str) -> dict[str, Any]:
        """Return one learning job with status, progress and loss history."""

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Cancel a learning job at any stage; return it."""

    async def list_goals(self, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """List goals with their steps and progress, oldest first: at most `limit` (None: all)
        from `offset`."""

    async def create_goal(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Create a goal (legacy shape or explicit steps); return it."""

    async def get_goal(self, goal_id: str) -> dict[str, Any]:
        """Return one goal."""

    async def cancel_goal(self, goal_id: str) -> dict[str, Any]:
        """Cancel a goal and the jobs it started; return it."""

    def cluster_view(self) -> dict[str, Any]:
        """Describe the cluster as this node sees it: members, primary and term, model holders.

        Keys: `enabled`, `self`, `primary` ({name, term} or None), `term`, `members` (each with
        name, state, incarnation, devices, models), `models` (model -> holder names).
        """
