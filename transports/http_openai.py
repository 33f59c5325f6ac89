"""The OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings.

Requests parse with `transports.openai_params` (every key honoured or refused) and run through
the same Dispatcher as the legacy routes, so limits, timeouts and the error mapping are written
once. A streamed answer is server-sent
events; its first item is awaited before the headers, so an early refusal keeps its status code.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from actors.errors import InvalidRequest, MocError, ModelNotFound, RequestTimeout
from actors.types import EmbedResult, InferRequest, InferResult, TokenChunk, TokenLogprob
from transports.auth import client_error
from transports.errors import classify
from transports.http_bodies import (
    CONFIG_KEY,
    dispatcher_of,
    dumps,
    json_response,
    openai_error_body,
    read_json,
)
from transports.metrics import STREAMS_CLOSED_BY_CLIENT
from transports.openai_params import (
    EmbeddingsRequest,
    OpenAIRequest,
    parse_chat,
    parse_completion,
    parse_embeddings,
)

__all__ = ["SSE_DONE", "add_routes", "embeddings_body", "sse", "usage"]

log = logging.getLogger(__name__)


def add_routes(r: web.UrlDispatcher) -> None:
    """Add the OpenAI-compatible routes to `r`."""
    r.add_get("/v1/models", _v1_models)
    r.add_get("/v1/models/{model}", _v1_model)
    r.add_post("/v1/completions", _v1_completions)
    r.add_post("/v1/chat/completions", _v1_chat)
    r.add_post("/v1/embeddings", _v1_embeddings)


def _openai_model(view: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": view["name"],
        "object": "model",
        "created": 0,
        "owned_by": "moc-node",
        "state": view["state"],
        "backend": view["backend"],
        "chat_template": view.get("chat_template"),
    }


async def _v1_models(request: web.Request) -> web.Response:
    listing = await dispatcher_of(request).call("list_models", {})
    return json_response({"object": "list", "data": [_openai_model(m) for m in listing["models"]]})


async def _v1_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    listing = await dispatcher_of(request).call("list_models", {})
    for view in listing["models"]:
        if view["name"] == name:
            return json_response(_openai_model(view))
    raise ModelNotFound(f"model {name!r} does not exist")


@dataclass(frozen=True, slots=True)
class _Shape:
    """How one OpenAI endpoint words its bodies and chunks."""

    chat: bool
    id: str
    created: int
    model: str
    echo: str = ""
    """Completions with `echo`: the prompt, sent before the generated text."""
    _piece_frame: tuple[bytes, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Every token's chunk is the same event but for its text, which comes last: encode the
        # rest once per stream (a streamed token costs the node one JSON string, not an event).
        marker = "\x00piece\x00"
        head, _, tail = self.chunk(marker, None).rpartition(dumps(marker).encode("utf-8"))
        object.__setattr__(self, "_piece_frame", (head, tail))

    def piece(self, text: str) -> bytes:
        """Return the chunk carrying one piece of generated text: `chunk(text, None)`."""
        head, tail = self._piece_frame
        return head + dumps(text).encode("utf-8") + tail

    def body(self, result: InferResult) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "logprobs": None if result.logprobs is None else self.logprobs(result.logprobs),
            "finish_reason": result.finish_reason,
        }
        if self.chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = self.echo + result.text
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(result),
        }

    def logprobs(self, tokens: tuple[TokenLogprob, ...]) -> dict[str, Any]:
        """Return the tokens' log probabilities in this endpoint's shape."""
        if self.chat:
            return {
                "content": [
                    {**_token(piece, logprob), "top_logprobs": [_token(*t) for t in top]}
                    for piece, logprob, top in tokens
                ],
                "refusal": None,
            }
        texts = [_text(piece) for piece, _, _ in tokens]
        offsets = list(itertools.accumulate((len(t) for t in texts[:-1]), initial=len(self.echo)))
        return {
            "tokens": texts,
            "token_logprobs": [logprob for _, logprob, _ in tokens],
            "top_logprobs": [{_text(p): lp for p, lp in top} for _, _, top in tokens],
            "text_offset": offsets if tokens else [],
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


def _text(piece: bytes) -> str:
    # A token may hold part of a UTF-8 character: its text shows U+FFFD there, its bytes are whole.
    return piece.decode("utf-8", errors="replace")


def _token(piece: bytes, logprob: float) -> dict[str, Any]:
    return {"token": _text(piece), "logprob": logprob, "bytes": list(piece)}


def usage(result: InferResult) -> dict[str, int]:
    """Return OpenAI's usage object for a result."""
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.tokens_generated,
        "total_tokens": result.prompt_tokens + result.tokens_generated,
    }


def sse(data: Any) -> bytes:
    """Encode one server-sent event carrying JSON."""
    return b"data: " + dumps(data).encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


async def _v1_completions(request: web.Request) -> web.StreamResponse:
    return await _openai_infer(request, parse_completion(await read_json(request)), chat=False)


async def _v1_chat(request: web.Request) -> web.StreamResponse:
    return await _openai_infer(request, parse_chat(await read_json(request)), chat=True)


async def _openai_infer(
    request: web.Request, parsed: OpenAIRequest, *, chat: bool
) -> web.StreamResponse:
    req = parsed.infer
    prefix = "chatcmpl" if chat else "cmpl"
    echo = req.prompt if parsed.echo and isinstance(req.prompt, str) else ""
    shape = _Shape(chat, f"{prefix}-{uuid.uuid4().hex}", int(time.time()), req.model, echo)
    dispatcher = dispatcher_of(request)
    if not parsed.stream:
        return json_response(shape.body(await dispatcher.infer(req)))
    return await _stream(request, dispatcher.with_deadline(req), shape, parsed.include_usage)


async def _v1_embeddings(request: web.Request) -> web.Response:
    parsed = parse_embeddings(await read_json(request))
    dispatcher = dispatcher_of(request)
    seconds = dispatcher.config.request_timeout_s
    req = dataclasses.replace(parsed.embed, timeout_s=seconds)
    try:
        async with asyncio.timeout(seconds):
            result = await dispatcher.node.embed(req)
    except TimeoutError:
        raise RequestTimeout(f"embeddings did not finish within {seconds:g} s") from None
    return json_response(embeddings_body(parsed, result))


def embeddings_body(parsed: EmbeddingsRequest, result: EmbedResult) -> dict[str, Any]:
    """Return OpenAI's embeddings list; refuse a `dimensions` other than the model's."""
    n_embd = len(result.vectors[0]) // 4 if result.vectors else 0
    if parsed.dimensions is not None and parsed.dimensions != n_embd:
        raise InvalidRequest(
            "dimensions",
            f"this model's embeddings have {n_embd} dimensions; got {parsed.dimensions}",
        )
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(vector).decode("ascii")
            if parsed.base64
            else list(struct.unpack(f"<{len(vector) // 4}f", vector)),
        }
        for i, vector in enumerate(result.vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": parsed.embed.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }


class _ClientGone(Exception):
    """The client closed the connection or stopped reading."""


async def _stream(
    request: web.Request, req: InferRequest, shape: _Shape, include_usage: bool
) -> web.StreamResponse:
    config = request.app[CONFIG_KEY]
    node = dispatcher_of(request).node
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
            elif shape.echo:
                await send(shape.chunk(shape.echo, None))
            item: TokenChunk | InferResult = first
            while isinstance(item, TokenChunk):
                await send(shape.piece(item.text))
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
            try:
                await send(sse(openai_error_body(client_error(classify(exc)))))
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
