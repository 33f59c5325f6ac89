"""The HTTP middlewares: count every request, answer every error as JSON, check API keys.

The metrics middleware counts what reaches the app; `RefusalCounter` (aiohttp's access-log hook)
counts what aiohttp's parser refused before that, so `moc_rest_requests_total` sees every answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler
from aiohttp.web_log import AccessLogger

from transports.auth import KeyRing, presented_key
from transports.config import ServerConfig
from transports.errors import ErrorReply, classify
from transports.http_bodies import error_response
from transports.metrics import IN_FLIGHT, record_http

__all__ = [
    "AUTHENTICATED_KEY",
    "METHODS",
    "UNPARSED_ROUTE",
    "RefusalCounter",
    "auth_middleware",
    "error_middleware",
    "method_label",
    "metrics_middleware",
]

COUNTED_KEY = web.RequestKey("counted", bool)
"""Set on every request the metrics middleware counts; `RefusalCounter` counts the others."""


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count the request in `moc_rest_requests_total` and hold the in-flight gauge meanwhile."""
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
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer any exception, aiohttp's own refusals included, with the JSON error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own refusals (no route, wrong method, body too large) in our JSON shape.
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status, "http_error"
        )
        response = error_response(request, ErrorReply(exc.status, code, exc.reason))
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception as exc:
        return error_response(request, classify(exc))


AUTHENTICATED_KEY = web.RequestKey("authenticated", bool)
"""True on a request that presented a good key, or on any request when no keys are set."""


def auth_middleware(keys: frozenset[str], config: ServerConfig) -> Any:
    """Return the middleware that refuses, with 401, a request without a good key.

    `config.open_paths` and the cluster page's own files are open to anyone.
    """
    ring = KeyRing(keys)
    open_paths = frozenset(config.open_paths)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        presented = presented_key(request.headers) if ring else None
        request[AUTHENTICATED_KEY] = not ring or (presented is not None and ring.matches(presented))
        # The cluster page's own files hold no data (the page sends a key for /cluster).
        page = request.path == "/" or request.path.startswith("/static/")
        if not request[AUTHENTICATED_KEY] and request.path not in open_paths and not page:
            reason = "missing API key" if presented is None else "invalid API key"
            response = error_response(request, ErrorReply(401, "unauthorized", reason))
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return await handler(request)

    return auth
