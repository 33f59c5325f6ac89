"""grpc.health.v1.Health on the gRPC front, tied to the node's readiness (what /ready answers).

NOT_SERVING until the node is ready, SERVING after, NOT_SERVING again when it drains or the
server stops, for the service names "" (the server) and "ModelOps"; another name is NOT_FOUND
to Check and SERVICE_UNKNOWN to Watch, as grpcio-health-checking's own servicer answers. The
messages are the standard ones (grpc_health.v1.health_pb2). Watch sends the status, then each
change; the server's stop sends NOT_SERVING and ends every Watch, so an idle watcher never holds
a shutdown for its whole grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from transports.grpc_codec import GrpcError, Refused

__all__ = ["HEALTH_SERVICE", "ReadinessHealth"]

HEALTH_SERVICE = "grpc.health.v1.Health"

Context = Any  # grpc.aio.ServicerContext (grpcio ships no type hints)
Served = Callable[[str, Context], contextlib.AbstractAsyncContextManager[None]]
"""Counts and times one call under a method name (the server's, shared with ModelOps)."""

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class ReadinessHealth:
    """The Health service, following `ready()` every `poll_s` seconds between start and stop."""

    def __init__(
        self, ready: Callable[[], bool], services: tuple[str, ...], *, poll_s: float
    ) -> None:
        self._ready = ready
        self._services = frozenset(services)
        self._poll_s = poll_s
        self._serving = False
        self._stopped = False
        self._changed = asyncio.Event()  # replaced on each change: waiters hold the old one
        self._follower: asyncio.Task[None] | None = None

    def handlers(self, served: Served) -> Any:
        """Return the service's method table (a grpc generic handler), counting each call."""

        async def check(request: Any, context: Context) -> Any:
            async with served("Health/Check", context):
                status = self._status(request.service)
                if status == _UNKNOWN:
                    error = GrpcError(grpc.StatusCode.NOT_FOUND, "unknown service", ())
                    raise Refused("unknown_service", error)
                return health_pb2.HealthCheckResponse(status=status)

        async def watch(request: Any, context: Context) -> None:
            async with served("Health/Watch", context):
                await self._watch(request.service, context)

        def method(handler: Any, kind: Callable[..., Any]) -> Any:
            return kind(
                handler,
                request_deserializer=health_pb2.HealthCheckRequest.FromString,
                response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
            )

        return grpc.method_handlers_generic_handler(
            HEALTH_SERVICE,
            {
                "Check": method(check, grpc.unary_unary_rpc_method_handler),
                "Watch": method(watch, grpc.unary_stream_rpc_method_handler),
            },
        )

    async def start(self) -> None:
        """Follow readiness until stopped."""
        self._follower = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        """Say NOT_SERVING for good and end every Watch."""
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
            self._follower = None
        self._stopped = True
        self._set(False)

    async def _follow(self) -> None:
        while True:
            self._set(self._ready())
            await asyncio.sleep(self._poll_s)

    def _set(self, serving: bool) -> None:
        changed = serving != self._serving
        self._serving = serving
        if changed or self._stopped:
            self._changed.set()
            self._changed = asyncio.Event()

    def _status(self, service: str) -> Any:
        if service not in self._services:
            return _UNKNOWN
        return _SERVING if self._serving and not self._stopped else _NOT_SERVING

    async def _watch(self, service: str, context: Context) -> None:
        sent = None
        while True:
            changed = self._changed  # taken before reading: a change while writing is not lost
            status = self._status(service)
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if self._stopped:
                return
            await changed.wait()
