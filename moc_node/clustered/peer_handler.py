"""What this node does for its peers (transports.peer.PeerHandler): serve here, never forward.

A request from a peer was already forwarded once, so it is served by the LocalNode whatever
this node's routing would say; placement commands go to `Placement`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from actors.types import (
    EmbedRequest,
    EmbedResult,
    InferRequest,
    InferResult,
    LoadRequest,
    ModelInfo,
)
from moc_node.clustered.placement import Placement
from moc_node.node import LocalNode, StreamItem


class PeerHandler:
    """Answer the peer RPC with this host's models and the placement it keeps."""

    def __init__(self, local: LocalNode, placement: Placement) -> None:
        self._local = local
        self._placement = placement

    async def peer_infer(self, req: InferRequest) -> InferResult:
        return await self._local.infer(req)

    def peer_infer_stream(self, req: InferRequest) -> AsyncGenerator[StreamItem, None]:
        return self._local.infer_stream(req)

    async def peer_embed(self, req: EmbedRequest) -> EmbedResult:
        return await self._local.embed(req)

    async def peer_load(self, req: LoadRequest, term: int | None) -> ModelInfo:
        """Load on the primary's command (refused from a deposed primary's term)."""
        return await self._placement.load_on_command(req, term)

    async def peer_place(self, model: str) -> str:
        """As the primary: have `model` loaded on the best node; return the holder."""
        return await self._placement.place_as_primary(model)

    async def peer_restore(self, model: str, node: str) -> str:
        """As the primary: say where `model`, remembered by restarting `node`, belongs."""
        return await self._placement.reserve_for_restore(model, node)


__all__ = ["PeerHandler"]
