"""The legacy gRPC front (grpc.aio on the node's event loop): ModelOps and grpc.health.v1.Health.

Wire contract: proto/modelops.proto (no package: methods at /ModelOps/<Method>). Each method
runs an action of `transports.dispatch`'s table, as ZMQ and REST do, through the adapter in
`transports.grpc_codec`; a failure is answered with a gRPC status code (that module's table) and
trailing metadata, and every call is counted in `moc_grpc_requests_total{method,outcome}`.

Who may call: `x-api-key` metadata or `authorization: Bearer <key>`, checked like the HTTP
front's header (transports.auth.KeyRing); HealthCheck and the Health service are open.
The client's deadline bounds the request's timeout. A message larger than
`server.max_body_bytes` (the HTTP body limit: a gRPC message is an HTTP/2 body) is refused
with RESOURCE_EXHAUSTED and counted `too_large` (see HARD_LIMIT_FACTOR).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import empty_pb2
from multidict import CIMultiDict

from actors.errors import InvalidRequest, Overloaded
from actors.types import InferResult
from transports import grpc_codec, schema
from transports.api import NodeAPI
from transports.auth import KeyRing, client_error, presented_key, public_health
from transports.config import ServerConfig, load_api_keys
from transports.dispatch import Dispatcher, legacy_field_error
from transports.errors import PayloadTooLarge, Unauthorized, classify
from transports.grpc_codec import GrpcError, Refused
from transports.grpc_gen import modelops_pb2 as pb
from transports.grpc_health import ReadinessHealth
from transports.metrics import IN_FLIGHT, GrpcRecorder

__all__ = ["GrpcServer", "HEALTH_SERVICES", "SERVICE"]

log = logging.getLogger(__name__)

SERVICE = "ModelOps"
"""The service's full name: no proto package, so the methods are /ModelOps/<Method>."""

HEALTH_SERVICES = ("", SERVICE)
"""The names grpc.health.v1.Health answers for: the server as a whole, and ModelOps."""

HARD_LIMIT_FACTOR = 4
"""grpc's own receive cap, in multiples of `server.max_body_bytes`: a message between the two is
refused by the method, as RESOURCE_EXHAUSTED counted `too_large`; one past this, by grpc itself
(RESOURCE_EXHAUSTED too, but before any method runs, so uncounted)."""

M = TypeVar("M")
Context = Any  # grpc.aio.ServicerContext (grpcio ships no type hints)
Handler = Callable[[Any, Context], Awaitable[Any]]


class _Message(Protocol):
    """What `_decode` uses of a generated protobuf message."""

    DESCRIPTOR: Any

    def ParseFromString(self, data: bytes) -> int: ...


Msg = TypeVar("Msg", bound=_Message)


class GrpcServer:
    """Serve ModelOps and the Health service on `[server] grpc_port` until stopped."""

    def __init__(
        self,
        node: NodeAPI,
        config: ServerConfig,
        *,
        dispatcher: Dispatcher | None = None,
        api_keys: frozenset[str] | None = None,
        credentials: grpc.ServerCredentials | None = None,
        readiness_poll_s: float = 0.1,
    ) -> None:
        """`credentials`: TLS for the port (None: plain text). `readiness_poll_s`: how often
        the Health service looks at `node.is_ready()`; a watcher hears a change within it."""
        self._dispatcher = dispatcher or Dispatcher(node, config)
        self._node = node
        self._config = config
        self._keys = KeyRing(load_api_keys(config) if api_keys is None else api_keys)
        self._credentials = credentials
        self._server: Any = None  # grpc.aio.Server
        self._health = ReadinessHealth(node.is_ready, HEALTH_SERVICES, poll_s=readiness_poll_s)
        self._workers = asyncio.Semaphore(config.max_workers)
        self._pending = 0
        self._recorder = GrpcRecorder()
        self._in_flight = IN_FLIGHT.labels(transport="grpc")
        self.port = 0

    async def start(self) -> None:
        """Bind the port and start serving."""
        config = self._config
        host = f"[{config.host}]" if ":" in config.host else config.host
        _check_bindable(config.host, config.grpc_port)
        server = grpc.aio.server(
            options=[
                # Past max_body_bytes the method refuses (counted); grpc's own cap, uncounted,
                # only bounds the memory a message may take before that.
                ("grpc.max_receive_message_length", HARD_LIMIT_FACTOR * config.max_body_bytes),
                # grpc reuses ports by default: a second node would share the port silently.
                ("grpc.so_reuseport", 0),
            ],
        )
        server.add_generic_rpc_handlers((self._handlers(), self._health.handlers(self._served)))
        address = f"{host}:{config.grpc_port}"
        try:
            if self._credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, self._credentials)
        except RuntimeError as exc:  # grpc says only "failed to bind"
            await server.stop(None)
            raise OSError(errno.EADDRNOTAVAIL, str(exc)) from None
        await server.start()
        self._server = server
        self.port = port
        await self._health.start()
        if not self._keys:
            log.warning("no API keys configured: the gRPC port is open (dev only)")
        log.info(
            "gRPC server listening on %s:%d (%s)",
            config.host,
            port,
            "TLS" if self._credentials is not None else "plain text",
        )

    async def stop(self) -> None:
        """Say NOT_SERVING (ending health watches), let calls in flight finish within the
        grace period, then close."""
        await self._health.stop()
        if self._server is not None:
            await self._server.stop(self._config.shutdown_timeout_s)
            self._server = None

    async def __aenter__(self) -> GrpcServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- the method table ----

    def _handlers(self) -> Any:
        def unary(handler: Handler, reply: Any) -> Any:
            return grpc.unary_unary_rpc_method_handler(
                handler, request_deserializer=_raw, response_serializer=reply.SerializeToString
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Infer": unary(self._infer, pb.InferenceResponse),
                "LoadModel": unary(self._load, pb.ModelLoadReply),
                "UnloadModel": unary(self._unload, pb.ModelUnloadReply),
                "ListModels": unary(self._list_models, pb.ModelList),
                "GetSystemStatus": unary(self._status, pb.SystemStatus),
                "HealthCheck": unary(self._health_check, pb.HealthResponse),
                "InferStream": grpc.unary_stream_rpc_method_handler(
                    self._infer_stream,
                    request_deserializer=_raw,
                    response_serializer=pb.InferenceChunk.SerializeToString,
                ),
            },
        )

    async def _infer(self, data: bytes, context: Context) -> pb.InferenceResponse:
        async def run(d: Dispatcher) -> pb.InferenceResponse:
            req = self._decode(pb.InferenceRequest, data)
            return grpc_codec.infer_reply(await d.call("infer", grpc_codec.infer_payload(req)))

        return await self._call("Infer", context, run, bounded=True)

    async def _load(self, data: bytes, context: Context) -> pb.ModelLoadReply:
        async def run(d: Dispatcher) -> pb.ModelLoadReply:
            req = self._decode(pb.ModelLoadRequest, data)
            return grpc_codec.load_reply(await d.call("load_model", grpc_codec.load_payload(req)))

        return await self._call("LoadModel", context, run, bounded=True)

    async def _unload(self, data: bytes, context: Context) -> pb.ModelUnloadReply:
        async def run(d: Dispatcher) -> pb.ModelUnloadReply:
            req = self._decode(pb.ModelUnloadRequest, data)
            view = await d.call("unload_model", grpc_codec.unload_payload(req))
            return grpc_codec.unload_reply(view)

        return await self._call("UnloadModel", context, run, bounded=True)

    async def _list_models(self, data: bytes, context: Context) -> pb.ModelList:
        async def run(d: Dispatcher) -> pb.ModelList:
            self._decode(empty_pb2.Empty, data)
            view = await d.call("list_models", {"limit": schema.PAGE_LIMIT_MAX})
            return grpc_codec.model_list(view)

        return await self._call("ListModels", context, run)

    async def _status(self, data: bytes, context: Context) -> pb.SystemStatus:
        async def run(d: Dispatcher) -> pb.SystemStatus:
            self._decode(empty_pb2.Empty, data)
            return grpc_codec.system_status(await d.call("status", {}))

        return await self._call("GetSystemStatus", context, run)

    async def _health_check(self, data: bytes, context: Context) -> pb.HealthResponse:
        authenticated = self._authenticated(context)

        async def run(d: Dispatcher) -> pb.HealthResponse:
            self._decode(empty_pb2.Empty, data)
            view = await d.call("health", {})
            return grpc_codec.health_reply(view if authenticated else public_health(view))

        return await self._call("HealthCheck", context, run, open_to_all=True)

    async def _infer_stream(
        self, data: bytes, context: Context
    ) -> AsyncIterator[pb.InferenceChunk]:
        # Not bounded by max_workers, as HTTP's streams are not: a stream would hold a slot for
        # its whole length; the model's bulkhead bounds it, as every request.
        async with self._served("InferStream", context):
            self._admit(context, open_to_all=False, bounded=False)
            req = self._decode(pb.InferenceRequest, data)
            try:
                infer = schema.parse_infer(grpc_codec.infer_payload(req))
            except InvalidRequest as exc:
                raise legacy_field_error(exc) from None
            dispatcher = self._dispatcher.within(context.time_remaining())
            async for item in dispatcher.stream(infer):
                if isinstance(item, InferResult):
                    yield grpc_codec.stream_result(item)
                else:
                    yield pb.InferenceChunk(text=item.text)

    # ---- the shared path of every method ----

    async def _call(
        self,
        method: str,
        context: Context,
        run: Callable[[Dispatcher], Awaitable[M]],
        *,
        bounded: bool = False,
        open_to_all: bool = False,
    ) -> M:
        """Check the caller, bound the work, run it within the client's deadline, count it.

        `bounded`: the call may wait on the node (infer, load, unload), so it takes one of
        `max_workers` slots, with at most `max_pending` more calls waiting, as on ZMQ.
        """
        async with self._served(method, context):
            self._admit(context, open_to_all=open_to_all, bounded=bounded)
            dispatcher = self._dispatcher.within(context.time_remaining())
            if not bounded:
                return await run(dispatcher)
            self._pending += 1
            try:
                async with self._workers:
                    return await run(dispatcher)
            finally:
                self._pending -= 1
        raise AssertionError("unreachable: _served ends a failed call with its status")

    @contextlib.asynccontextmanager
    async def _served(self, method: str, context: Context) -> AsyncIterator[None]:
        """Serve one call: hold the in-flight gauge, count the call under `method` and its
        outcome, and answer a failure with its status code (after counting it: the status is
        on the wire as soon as it is sent)."""
        t0 = time.perf_counter()
        outcome = "ok"
        error: GrpcError | None = None
        self._in_flight.inc()
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            # GeneratorExit: grpc closed a stream whose client left between two messages.
            outcome = _gone(context)
            raise
        except Refused as refused:
            outcome, error = refused.outcome, refused.error
        except Exception as exc:
            err = client_error(classify(exc))
            outcome, error = err.code, grpc_codec.grpc_error(err)
        finally:
            self._in_flight.dec()
            self._recorder.record(method, outcome, time.perf_counter() - t0)
        if error is not None:
            await context.abort(error.code, error.details, trailing_metadata=error.trailers)

    def _admit(self, context: Context, *, open_to_all: bool, bounded: bool) -> None:
        """Refuse a call without a good key (unless open to all), or past the pending bound."""
        if not open_to_all and self._keys:
            presented = _presented_key(context)
            if presented is None:
                raise Unauthorized("missing API key")
            if not self._keys.matches(presented):
                raise Unauthorized("invalid API key")
        config = self._config
        if bounded and self._pending >= config.max_workers + config.max_pending:
            raise Overloaded("too many gRPC requests in progress", retry_after=1.0)

    def _decode(self, message: Callable[[], Msg], data: bytes) -> Msg:
        return _decode(message, data, self._config.max_body_bytes)

    def _authenticated(self, context: Context) -> bool:
        if not self._keys:
            return True
        presented = _presented_key(context)
        return presented is not None and self._keys.matches(presented)


def _presented_key(context: Context) -> str | None:
    """The key in `x-api-key` or `authorization: Bearer` metadata, read as the HTTP front
    reads its headers."""
    return presented_key(CIMultiDict(context.invocation_metadata() or ()))


def _raw(data: bytes) -> bytes:
    """Hand the request bytes to the method: a message that does not parse is then refused
    there (INVALID_ARGUMENT, counted) rather than by grpc (INTERNAL, uncounted)."""
    return data


def _decode(message: Callable[[], Msg], data: bytes, limit: int) -> Msg:
    """Parse `data` as `message`, refusing it past `limit` bytes or when it does not parse."""
    if len(data) > limit:
        raise PayloadTooLarge(
            f"request of {len(data)} bytes exceeds the limit of {limit} (server.max_body_bytes)"
        )
    msg = message()
    try:
        msg.ParseFromString(data)
    except Exception:  # protobuf's DecodeError, whichever backend raises it
        raise InvalidRequest("request", f"is not a valid {msg.DESCRIPTOR.name}") from None
    return msg


def _gone(context: Context) -> str:
    """Name why a call was cancelled: its deadline passed, or the client went away."""
    remaining = context.time_remaining()
    return "timeout" if remaining is not None and remaining <= 0 else "cancelled"


def _check_bindable(host: str, port: int) -> None:
    """Bind and release `host:port` first, so a port in use fails with its errno (grpc only
    says "failed to bind")."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
