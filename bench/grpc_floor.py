"""The floor under bench/grpc_load.py: what grpc.aio and aiohttp cost per call doing nothing.

Two bare servers, each alone in a process: a grpc.aio server whose one unary method
(/ModelOps/Infer) returns constant bytes, and an aiohttp server whose one route returns constant
JSON. 16 closed-loop asyncio clients in another process call each for 3 s. Prints req/s and the
server process's CPU per request (user + system, from /proc), and the ratio of the two: the
best a gRPC front on grpc.aio can do against an HTTP front on aiohttp when the node's own work
per request is nothing. With the node's work W per request (the same for both fronts), the
ratio of node CPU is (http + W) / (grpc + W).

    .venv/bin/python bench/grpc_floor.py [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from zmq_load import cpu_seconds, free_port  # noqa: E402

CLIENTS = 16
SECONDS = 3.0


def _grpc_server(port: int, ready: Any) -> None:
    import grpc

    async def main() -> None:
        async def infer(_data: bytes, _context: Any) -> bytes:
            return b"\x0a\x02ok"

        method = grpc.unary_unary_rpc_method_handler(infer)
        handlers = grpc.method_handlers_generic_handler("ModelOps", {"Infer": method})
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handlers,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


def _http_server(port: int, ready: Any) -> None:
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/infer", infer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def _clients(kind: str, port: int, out: Any) -> None:
    async def main() -> int:
        done = 0
        stop = time.monotonic() + SECONDS
        if kind == "grpc":
            import grpc

            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            call = channel.unary_unary("/ModelOps/Infer")

            async def loop() -> None:
                nonlocal done
                while time.monotonic() < stop:
                    await call(b"\x0a\x01a")
                    done += 1
        else:
            import aiohttp

            session = aiohttp.ClientSession()

            async def loop() -> None:
                nonlocal done
                while time.monotonic() < stop:
                    async with session.post(f"http://127.0.0.1:{port}/infer", json={"a": 1}) as r:
                        await r.read()
                    done += 1

        await asyncio.gather(*(loop() for _ in range(CLIENTS)))
        return done

    out.put(asyncio.run(main()))


def measure(kind: str, port: int) -> dict[str, float]:
    """Run one bare server under the clients; return its req/s and CPU us per request."""
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    target = _grpc_server if kind == "grpc" else _http_server
    server = ctx.Process(target=target, args=(port, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise RuntimeError(f"the bare {kind} server did not start")
        assert server.pid is not None
        before = cpu_seconds(server.pid)
        clients = ctx.Process(target=_clients, args=(kind, port, out))
        clients.start()
        done = out.get(timeout=60)
        clients.join()
        used = cpu_seconds(server.pid) - before
    finally:
        server.kill()
        server.join()
    return {"rps": round(done / SECONDS), "server_us": round(1e6 * used / done)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(argv)
    http = measure("http", free_port())
    grpc_ = measure("grpc", free_port())
    ratio = round(http["server_us"] / grpc_["server_us"], 3)
    print(f"bare servers, {CLIENTS} closed-loop clients, {SECONDS:g} s each, {os.cpu_count()} CPUs")
    print(f"aiohttp   {http['rps']:>6} req/s  {http['server_us']:>5} us/req")
    print(f"grpc.aio  {grpc_['rps']:>6} req/s  {grpc_['server_us']:>5} us/req")
    print(f"server CPU per request, aiohttp / grpc.aio: {ratio}")
    if args.json:
        print(json.dumps({"http": http, "grpc": grpc_, "cpu_ratio_http_over_grpc": ratio}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
