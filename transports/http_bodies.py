"""What every HTTP route reads and writes: the JSON body in, JSON out, and the error shape.

Errors on `/v1/...` come in OpenAI's shape, elsewhere in the legacy shape; both carry the code
and status `transports.errors.classify` gives, so an error reads the same on every transport.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from actors.errors import InvalidRequest
from transports.auth import client_error
from transports.config import ServerConfig
from transports.dispatch import Dispatcher
from transports.errors import ClientTimeout, ErrorReply, PayloadTooLarge

__all__ = [
    "CONFIG_KEY",
    "DISPATCHER_KEY",
    "OPENAI_PREFIX",
    "dispatcher_of",
    "dumps",
    "error_response",
    "json_response",
    "openai_error_body",
    "openai_error_type",
    "read_json",
]

DISPATCHER_KEY = web.AppKey("dispatcher", Dispatcher)
CONFIG_KEY = web.AppKey("config", ServerConfig)
OPENAI_PREFIX = "/v1/"
"""Paths under this prefix get errors in OpenAI's shape."""


def error_response(request: web.Request, err: ErrorReply) -> web.Response:
    """Answer `err` in the shape the path's API uses, with Retry-After when it carries one."""
    err = client_error(err)
    if request.path.startswith(OPENAI_PREFIX):
        body = openai_error_body(err)
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
    return json_response(body, status=err.status, headers=headers)


def openai_error_body(err: ErrorReply) -> dict[str, Any]:
    """Return `err` in OpenAI's error shape (the caller has passed it through client_error)."""
    return {
        "error": {
            "message": err.message,
            "type": openai_error_type(err.status),
            "code": err.code,
            "param": err.field,
        }
    }


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


def json_response(
    body: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """Return `body` as compact UTF-8 JSON."""
    return web.json_response(body, status=status, headers=headers, dumps=dumps)


def dumps(obj: Any) -> str:
    """Encode `obj` as compact JSON, non-ASCII text kept as is."""
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


def dispatcher_of(request: web.Request) -> Dispatcher:
    """Return the app's Dispatcher."""
    return request.app[DISPATCHER_KEY]

