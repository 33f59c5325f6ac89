"""A server that does nothing but answer: the floor of bench/batching.py's TTFT figures.

`POST /v1/completions` answers at once with an OpenAI-style event stream of `max_tokens`
one-character pieces, the usage and `[DONE]`, with no model and no work between events;
`GET /health` answers 200. It runs on aiohttp, as the node's HTTP front does, in a process of
its own, so the bench's clients pay what they pay any server, and the server what any aiohttp
server pays for a request: what remains of a TTFT measured against it is the harness's.

    .venv/bin/python bench/sse_floor.py PORT
"""

from __future__ import annotations

import json
import sys

from aiohttp import web

PIECE = b'data: {"choices":[{"text":"x","index":0,"finish_reason":null}]}\n\n'


async def completions(request: web.Request) -> web.StreamResponse:
    """Stream `max_tokens` pieces, the usage (always: `stream_options` is not read) and
    `[DONE]`, each written as soon as the last."""
    tokens = int((await request.json()).get("max_tokens") or 1)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for _ in range(tokens):
        await response.write(PIECE)
    usage = {"choices": [], "usage": {"completion_tokens": tokens}}
    await response.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
    return response


async def health(_request: web.Request) -> web.Response:
    """Say the server is up (what the bench waits for)."""
    return web.Response(text="ok")


def main(argv: list[str]) -> int:
    """Serve on 127.0.0.1 at the port `argv[0]` until stopped, with no access log."""
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=int(argv[0]), print=None, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
