"""The HTTP front (aiohttp): legacy REST, the OpenAI-compatible API, health, readiness, metrics.

Legacy routes and ZeroMQ share the action table of `transports.dispatch`; the OpenAI routes parse
with `transports.schema` and call the same Dispatcher, so limits, timeouts and the error mapping are
written once. Errors on `/v1/...` come in OpenAI's shape, elsewhere in the legacy shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_log import AccessLogger

from actors.errors import InvalidRequest, MocError, ModelNotFound, RequestTimeout
from actors.types import InferRequest, InferResult, TokenChunk
from transports import schema
from transports.api import NodeAPI
from transports.auth import KeyRing, client_error, public_health
from transports.config import ServerConfig, load_api_keys
from transports.dispatch import (
    ClientTimeout,
    Dispatcher,
    ErrorReply,
    PayloadTooLarge,
    classify,
    health_view,
)
from transports.http_guard import GuardedSite, connection_middleware
from transports.metrics import IN_FLIGHT, STREAMS_CLOSED_BY_CLIENT, record_http, render

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

COUNTED_KEY = web.RequestKey("counted", bool)
"""Set on every request the metrics middleware counts; `RefusalCounter` counts the others."""
DISPATCHER_KEY = web.AppKey("dispatcher", Dispatcher)
CONFIG_KEY = web.AppKey("config", ServerConfig)
OPENAI_PREFIX = "/v1/"


def build_app(
    node: NodeAPI,
    config: ServerConfig,
    *,
    dispatcher: Dispatcher | None = None,
    api_keys: frozenset[str] | None = None,
    static_dir: Path | None = None,
) -> web.Application:
    """Build the aiohttp application serving `node` (keys default to those of `config`)."""
    keys = load_api_keys(config) if api_keys is None else api_keys
    if not keys:
        log.warning("no API keys configured: every HTTP route is open (dev only)")
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[
            connection_middleware,
            _metrics_middleware,
            _error_middleware,
            _auth_middleware(keys, config),
        ],
    )
    app[DISPATCHER_KEY] = dispatcher or Dispatcher(node, config)
    app[CONFIG_KEY] = config
    r = app.router
    r.add_get("/health", _health)
    r.add_get("/ready", _ready)
    r.add_get("/metrics", _metrics)
    r.add_get("/status", _status)
    r.add_get("/devices", _devices)
    r.add_post("/inference", _inference)
    r.add_get("/models", _list_models)
    r.add_post("/models", _load_model)
    r.add_delete("/models/{model_name}", _unload_model)
    r.add_get("/learning/jobs", _collection("list_jobs"))
    r.add_post("/learning/jobs", _create("create_job"))
    r.add_get("/learning/jobs/{job_id}", _item("get_job", "job_id"))
    r.add_post("/learning/jobs/{job_id}/cancel", _item("cancel_job", "job_id"))
    r.add_delete("/learning/jobs/{job_id}", _item("cancel_job", "job_id"))
    r.add_get("/goals", _collection("list_goals"))
    r.add_post("/goals", _create("create_goal"))
    r.add_get("/goals/{goal_id}", _item("get_goal", "goal_id"))
    r.add_post("/goals/{goal_id}/cancel", _item("cancel_goal", "goal_id"))
    r.add_delete("/goals/{goal_id}", _item("cancel_goal", "goal_id"))
    r.add_get("/cluster", _cluster)
    if static_dir is not None:
        index = static_dir / "index.html"

        async def _index(request: web.Request) -> web.FileResponse:
            return web.FileResponse(index)

        r.add_get("/", _index)
        r.add_static("/static/", static_dir)
    r.add_get("/v1/models", _v1_models)
    r.add_get("/v1/models/{model}", _v1_model)
    r.add_post("/v1/completions", _v1_completions)
    r.add_post("/v1/chat/completions", _v1_chat)
    return app


# ---- middlewares ----


@web.middleware
async def _metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    t0 = time.perf_counter()
    request[COUNTED_KEY] = True
    status = 500
    gauge = IN_FLIGHT.labels(transport="http")
    gauge.inc()
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    finally:
        gauge.dec()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        record_http(method_label(request.method), route, status, time.perf_counter() - t0)


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
UNPARSED_ROUTE = "unparsed"
"""Route label of requests refused by aiohttp's parser (bad request line, headers too long)."""


def method_label(method: str) -> str:
    """Name the method for metrics without letting a client invent label values."""
    return method if method in METHODS else "other"


class RefusalCounter(AbstractAccessLogger):
    """Count the requests aiohttp refuses before the app sees them; write the access log.

    aiohttp answers a malformed request (request line, method token, headers too large) with 400
    from its protocol handler, bypassing the middlewares; its access log hook still sees it, so
    every answer is counted in `moc_rest_requests_total`, refusals included.
    """

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self._access = AccessLogger(logger, log_format)

    @property
    def enabled(self) -> bool:
        """Return True: counting must not depend on the access log's level."""
        return True

    def log(self, request: Any, response: web.StreamResponse, time: float) -> None:
        """Count `request` unless the middleware did, then log it if access logging is on."""
        if not request.get(COUNTED_KEY):
            record_http(method_label(request.method), UNPARSED_ROUTE, response.status, time)
        if self._access.enabled:
            self._access.log(request, response, time)


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own refusals (no route, wrong method, body too large) in our JSON shape.
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status, "http_error"
        )
        response = _error_response(request, ErrorReply(exc.status, code, exc.reason))
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception as exc:
        return _error_response(request, classify(exc))


AUTHENTICATED_KEY = web.RequestKey("authenticated", bool)
"""True on a request that presented a good key, or on any request when no keys are set."""


def _auth_middleware(keys: frozenset[str], config: ServerConfig) -> Any:
    ring = KeyRing(keys)
    open_paths = frozenset(config.open_paths)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        presented = presented_key(request.headers) if ring else None
        request[AUTHENTICATED_KEY] = not ring or (
            presented is not None and ring.matches(presented)
        )
        # The cluster page's own files hold no data (the page sends a key for /cluster).
        page = request.path == "/" or request.path.startswith("/static/")
        if not request[AUTHENTICATED_KEY] and request.path not in open_paths and not page:
            reason = "missing API key" if presented is None else "invalid API key"
            response = _error_response(request, ErrorReply(401, "unauthorized", reason))
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return await handler(request)

    return auth


def presented_key(headers: Mapping[str, str]) -> str | None:
    """Return the key in `X-API-Key` or `Authorization: Bearer`, if any."""
    key = headers.get("X-API-Key")
    if key:
        return key
    auth = headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


# ---- error bodies ----


def _error_response(request: web.Request, err: ErrorReply) -> web.Response:
    err = client_error(err)
    if request.path.startswith(OPENAI_PREFIX):
        body: dict[str, Any] = {
            "error": {
                "message": err.message,
                "type": openai_error_type(err.status),
                "code": err.code,
                "param": err.field,
            }
        }
    else:
        body = {"success": False, "error": err.message, "code": err.code, "detail": err.message}
        if err.field is not None:
            body["field"] = err.field
        if err.retry_after is not None:
            body["retry_after"] = err.retry_after
    headers = {}
    if err.retry_after is not None:
        # Retry-After takes whole seconds; round up so clients never come back too early.
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    return _json(body, status=err.status, headers=headers)


def openai_error_type(status: int) -> str:
    """Name the OpenAI error `type` for a status code."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def _json(
    body: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response(body, status=status, headers=headers, dumps=_dumps)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


async def read_json(request: web.Request) -> Any:
    """Read and decode the JSON body within the size limit and the read timeout."""
    config = request.app[CONFIG_KEY]
    length = request.content_length
    if length is not None and length > config.max_body_bytes:
        raise PayloadTooLarge(
            f"body of {length} bytes exceeds the limit of {config.max_body_bytes}"
        )
    try:
        async with asyncio.timeout(config.body_read_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise ClientTimeout(f"body not received within {config.body_read_timeout_s:g} s") from None
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"body exceeds the limit of {config.max_body_bytes} bytes") from None
    if not raw:
        raise InvalidRequest("body", "is empty; expected a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidRequest("body", "is not valid JSON") from None


def _dispatcher(request: web.Request) -> Dispatcher:
    return request.app[DISPATCHER_KEY]


# ---- legacy REST ----


async def _health(request: web.Request) -> web.Response:
    report = _dispatcher(request).node.health()
    body = health_view(report)
    if not request.get(AUTHENTICATED_KEY, False):
        body = public_health(body)  # open to anyone: details may name files
    # Load balancers act on the status code; the body keeps the legacy fields.
    return _json(body, status=503 if report.status == "unhealthy" else 200)


async def _ready(request: web.Request) -> web.Response:
    ready = _dispatcher(request).node.is_ready()
    return _json({"ready": ready}, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    data, content_type = render()
    return web.Response(body=data, headers={"Content-Type": content_type})


async def _status(request: web.Request) -> web.Response:
    return _json(await _dispatcher(request).call("status", {}))


async def _devices(request: web.Request) -> web.Response:
    return _json(await _dispatcher(request).call("list_devices", {}))


async def _inference(request: web.Request) -> web.Response:
    body = schema.require_object(await read_json(request), "body")
    return _json(await _dispatcher(request).call("infer", body))


async def _list_models(request: web.Request) -> web.Response:
    return _json(await _dispatcher(request).call("list_models", _page_query(request)))


def _page_query(request: web.Request) -> dict[str, str]:
    """Return a list request's paging parameters (`?limit=&offset=`); others are ignored."""
    return {key: request.query[key] for key in ("limit", "offset") if key in request.query}


async def _load_model(request: web.Request) -> web.Response:
    body = schema.require_object(await read_json(request), "body")
    return _json(await _dispatcher(request).call("load_model", body), status=201)


async def _unload_model(request: web.Request) -> web.Response:
    name = request.match_info["model_name"]
    return _json(await _dispatcher(request).call("unload_model", {"model_name": name}))


async def _cluster(request: web.Request) -> web.Response:
    return _json(await _dispatcher(request).call("cluster", {}))


def _collection(action: str) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        return _json(await _dispatcher(request).call(action, _page_query(request)))

    return handle


def _create(action: str) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        body = schema.require_object(await read_json(request), "body")
        return _json(await _dispatcher(request).call(action, body), status=201)

    return handle


def _item(action: str, key: str) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        return _json(await _dispatcher(request).call(action, {key: request.match_info[key]}))

    return handle


# ---- OpenAI-compatible ----


def _openai_model(view: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": view["name"],
        "object": "model",
        "created": 0,
        "owned_by": "moc-node",
        "state": view["state"],
        "backend": view["backend"],
    }


async def _v1_models(request: web.Request) -> web.Response:
    listing = await _dispatcher(request).call("list_models", {})
    return _json({"object": "list", "data": [_openai_model(m) for m in listing["models"]]})


async def _v1_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    listing = await _dispatcher(request).call("list_models", {})
    for view in listing["models"]:
        if view["name"] == name:
            return _json(_openai_model(view))
    raise ModelNotFound(f"model {name!r} does not exist")


@dataclass(frozen=True, slots=True)
class _Shape:
    """How one OpenAI endpoint words its bodies and chunks."""

    chat: bool
    id: str
    created: int
    model: str

    def body(self, result: InferResult) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "logprobs": None,
            "finish_reason": result.finish_reason,
        }
        if self.chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(result),
        }

    def chunk(self, text: str | None, finish_reason: str | None, *, role: bool = False) -> bytes:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return sse(
            {
                "id": self.id,
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [choice],
            }
        )

    def usage_chunk(self, result: InferResult) -> bytes:
        return sse(
            {
                "id": self.id,
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage(result),
            }
        )


def usage(result: InferResult) -> dict[str, int]:
    """Return OpenAI's usage object for a result."""
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.tokens_generated,
        "total_tokens": result.prompt_tokens + result.tokens_generated,
    }


def sse(data: Any) -> bytes:
    """Encode one server-sent event carrying JSON."""
    return b"data: " + _dumps(data).encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


async def _v1_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    req, stream = schema.parse_completion(body)
    return await _openai_infer(request, req, stream, chat=False, body=body)


async def _v1_chat(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    req, stream = schema.parse_chat(body)
    return await _openai_infer(request, req, stream, chat=True, body=body)


async def _openai_infer(
    request: web.Request, req: InferRequest, stream: bool, *, chat: bool, body: Mapping[str, Any]
) -> web.StreamResponse:
    prefix = "chatcmpl" if chat else "cmpl"
    shape = _Shape(chat, f"{prefix}-{uuid.uuid4().hex}", int(time.time()), req.model)
    dispatcher = _dispatcher(request)
    if not stream:
        return _json(shape.body(await dispatcher.infer(req)))
    options = body.get("stream_options")
    include_usage = isinstance(options, Mapping) and options.get("include_usage") is True
    return await _stream(request, dispatcher.with_deadline(req), shape, include_usage)


class _ClientGone(Exception):
    """The client closed the connection or stopped reading."""


async def _stream(
    request: web.Request, req: InferRequest, shape: _Shape, include_usage: bool
) -> web.StreamResponse:
    config = request.app[CONFIG_KEY]
    node = _dispatcher(request).node
    assert req.timeout_s is not None
    deadline = asyncio.get_running_loop().time() + req.timeout_s
    items = node.infer_stream(req)
    try:
        # The first item comes before the headers, so an early refusal (unknown model,
        # overloaded) still gets its own status code instead of a 200 stream.
        first = await _next_item(items, deadline)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)

        async def send(data: bytes) -> None:
            try:
                async with asyncio.timeout(config.stream_write_timeout_s):
                    await response.write(data)
            except (TimeoutError, ConnectionError) as exc:
                raise _ClientGone from exc

        try:
            if shape.chat:
                await send(shape.chunk("", None, role=True))
            item: TokenChunk | InferResult = first
            while isinstance(item, TokenChunk):
                await send(shape.chunk(item.text, None))
                item = await _next_item(items, deadline)
            await send(shape.chunk(None if shape.chat else "", item.finish_reason))
            if include_usage:
                await send(shape.usage_chunk(item))
        except _ClientGone:
            STREAMS_CLOSED_BY_CLIENT.inc()
            if request.transport is not None:
                request.transport.close()
            return response
        except asyncio.CancelledError:
            # A hang-up cancels the handler (handler_cancellation) with the transport gone; a
            # server shutdown cancels it with the transport still open: only count the first.
            if request.transport is None or request.transport.is_closing():
                STREAMS_CLOSED_BY_CLIENT.inc()
            raise
        except Exception as exc:
            # Headers are gone: report the error in the stream, as OpenAI does.
            err = client_error(classify(exc))
            payload = {
                "error": {
                    "message": err.message,
                    "type": openai_error_type(err.status),
                    "code": err.code,
                    "param": err.field,
                }
            }
            try:
                await send(sse(payload))
            except _ClientGone:
                return response
        try:
            await send(SSE_DONE)
            await response.write_eof()
        except _ClientGone:
            STREAMS_CLOSED_BY_CLIENT.inc()
        return response
    finally:
        # Closing the node's iterator is what cancels generation (NodeAPI contract).
        await _close(items)


async def _next_item(
    items: AsyncIterator[TokenChunk | InferResult], deadline: float
) -> TokenChunk | InferResult:
    try:
        async with asyncio.timeout_at(deadline):
            return await items.__anext__()
    except TimeoutError:
        raise RequestTimeout("inference did not finish within its deadline") from None
    except StopAsyncIteration:
        raise MocError("the node ended the stream without a result") from None


async def _close(items: AsyncIterator[Any]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            log.exception("closing the node's token stream failed")


# ---- running ----


class HttpServer:
    """Run the app on a TCP port until stopped; handlers are cancelled when clients disconnect."""

    def __init__(
        self,
        node: NodeAPI,
        config: ServerConfig,
        *,
        dispatcher: Dispatcher | None = None,
        api_keys: frozenset[str] | None = None,
        static_dir: Path | None = None,
    ) -> None:
        self.app = build_app(
            node, config, dispatcher=dispatcher, api_keys=api_keys, static_dir=static_dir
        )
        self._config = config
        self._runner: web.AppRunner | None = None
        self._site: GuardedSite | None = None
        self.port = 0

    async def start(self) -> None:
        """Bind the port and start serving."""
        # handler_cancellation: a client that hangs up cancels its handler, which closes the
        # node's stream or cancels the inference instead of generating for nobody.
        config = self._config
        runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            shutdown_timeout=config.shutdown_timeout_s,
            access_log_class=RefusalCounter,
            keepalive_timeout=config.keepalive_timeout_s,
        )
        await runner.setup()
        # The site bounds connections per address and the time to send a request head.
        site = GuardedSite(
            runner,
            config.host,
            config.rest_port,
            max_connections_per_ip=config.max_connections_per_ip,
            header_read_timeout_s=config.header_read_timeout_s,
        )
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self._site = site
        bound = [addr for addr in runner.addresses if isinstance(addr, tuple)]
        self.port = int(bound[0][1]) if bound else self._config.rest_port
        log.info("HTTP server listening on %s:%d", self._config.host, self.port)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, then close."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    def open_connections(self, address: str) -> int:
        """Return how many connections `address` holds open now."""
        return 0 if self._site is None else self._site.counts.held(address)

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve_http(
    node: NodeAPI,
    config: ServerConfig,
    *,
    dispatcher: Dispatcher | None = None,
    api_keys: frozenset[str] | None = None,
) -> HttpServer:
    """Start the HTTP server for `node`; call `await server.stop()` to end it."""
    server = HttpServer(node, config, dispatcher=dispatcher, api_keys=api_keys)
    await server.start()
    return server
