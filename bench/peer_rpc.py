"""Round trip of the peer RPC (one forwarded inference, trivial handler) against bare echoes.

Each phase runs a server in a child process and one client in this one, one request at a time
(what a forwarded request sees), on 127.0.0.1:

1. asyncio TCP echo: the floor for any Python transport on this machine (anchor);
2. libzmq DEALER/ROUTER echo, read and written from the loop as the node did before;
3. the peer RPC: a signed INFER envelope to a PeerServer whose handler answers at once;
4. the peer RPC with both ends in one process and one loop: its CPU cost alone, no wake-ups.

Prints p50 and p90 per phase and the peer RPC's p50 as a multiple of the TCP echo's; `--json`
adds one JSON object as the last line (`peer_rpc_p50_us`, `tcp_echo_p50_us`, ...).

    .venv/bin/python bench/peer_rpc.py --quick --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from actors.types import GenerationParams, InferRequest, InferResult  # noqa: E402
from cluster.keyring import Keyring  # noqa: E402

KEY = Keyring((b"moc-bench-peer-rpc-key-0123456789",))
RESULT = InferResult("x", 1, 2, "length", 1.0, "v1")
REQUEST = InferRequest(model="m", prompt="hi", params=GenerationParams(max_tokens=1))
PAYLOAD = b"x" * 200  # about a signed INFER envelope


class Answer:
    """A peer handler that answers every inference at once."""

    async def peer_infer(self, req: InferRequest) -> InferResult:
        return RESULT


async def serve(kind: str, port: Any) -> None:
    """Run one kind of server until killed; put its port on `port` (a queue)."""
    if kind == "tcp":

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port.put(server.sockets[0].getsockname()[1])
    elif kind == "zmq":
        import zmq

        from transports.loop_socket import LoopSocket

        sock = zmq.Context.instance().socket(zmq.ROUTER)
        port.put(sock.bind_to_random_port("tcp://127.0.0.1"))
        pump: list[LoopSocket] = []
        pump.append(LoopSocket(sock, lambda frames: pump[0].send(frames)))
    else:
        from transports.peer import PeerServer

        peer = PeerServer(
            Answer(),  # type: ignore[arg-type]
            KEY,
            name="server",
            host="127.0.0.1",
            port=0,
        )
        await peer.start()
        port.put(peer.port)
    await asyncio.Event().wait()


def server_main(kind: str, port: Any) -> None:
    asyncio.run(serve(kind, port))


async def client(kind: str, port: int, n: int) -> list[float]:
    """Return `n` round-trip times in seconds (after a warm-up)."""
    call: Callable[[], Awaitable[Any]]
    if kind == "tcp":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def call() -> None:
            writer.write(PAYLOAD)
            await reader.read(65536)

    elif kind == "zmq":
        import zmq

        from transports.loop_socket import LoopSocket

        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(f"tcp://127.0.0.1:{port}")
        loop = asyncio.get_running_loop()
        waiting: list[asyncio.Future[list[bytes]]] = []
        pump = LoopSocket(sock, lambda frames: waiting.pop().set_result(frames))

        async def call() -> None:
            waiting.append(loop.create_future())
            pump.send([PAYLOAD, b"t" * 32])
            await waiting[0]

    else:
        from transports.peer import PeerAddress, PeerClient

        peer = PeerClient(KEY, name="client")

        async def call() -> None:
            await peer.infer(PeerAddress("server", f"127.0.0.1:{port}"), REQUEST, timeout=10)

    return await timed(call, n)


async def timed(call: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    for _ in range(n // 5):
        await call()
    times = []
    for _ in range(n):
        began = time.perf_counter()
        await call()
        times.append(time.perf_counter() - began)
    return times


async def in_one_process(n: int) -> list[float]:
    from transports.peer import PeerAddress, PeerClient, PeerServer

    server = PeerServer(
        Answer(),  # type: ignore[arg-type]
        KEY,
        name="server",
        host="127.0.0.1",
        port=0,
    )
    await server.start()
    peer = PeerClient(KEY, name="client")
    try:
        at = PeerAddress("server", f"127.0.0.1:{server.port}")
        return await timed(lambda: peer.infer(at, REQUEST, 10), n)
    finally:
        peer.close()
        await server.stop()


def across_processes(kind: str, n: int) -> list[float]:
    ctx = mp.get_context("spawn")
    port = ctx.Queue()
    proc = ctx.Process(target=server_main, args=(kind, port), daemon=True)
    proc.start()
    try:
        return asyncio.run(client(kind, port.get(timeout=30), n))
    finally:
        proc.kill()
        proc.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer round trips (seconds)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(argv)
    n = 2000 if args.quick else 10000
    phases = {
        "tcp_echo": lambda: across_processes("tcp", n),
        "libzmq_echo": lambda: across_processes("zmq", n),
        "peer_rpc": lambda: across_processes("peer", n),
        "peer_rpc_one_process": lambda: asyncio.run(in_one_process(n)),
    }
    print(f"peer_rpc: {n} round trips per phase, one at a time, 127.0.0.1")
    print(f"{'phase':<24} {'p50 us':>8} {'p90 us':>8}")
    figures: dict[str, float] = {}
    for name, run in phases.items():
        times = sorted(run())
        p50, p90 = statistics.median(times) * 1e6, times[int(len(times) * 0.9)] * 1e6
        figures[f"{name}_p50_us"] = round(p50, 1)
        print(f"{name:<24} {p50:>8.0f} {p90:>8.0f}")
    ratio = figures["peer_rpc_p50_us"] / figures["tcp_echo_p50_us"]
    figures["peer_rpc_vs_tcp_echo"] = round(ratio, 2)
    print(f"peer RPC round trip: {ratio:.2f}x the asyncio TCP echo")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
