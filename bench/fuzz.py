"""Random and mutated frames against running moc-node processes, every port, good requests between.

Three `moc-node run` processes form a cluster on loopback (`tests/moc_node/cluster_procs.py`: one
shared key, profile "local", the generated tiny model `m` placed on one of them). The node that
holds `m` (the target) gets, port after port:

- zmq (legacy 7211): the live ZeroMQ test's stream (random bytes, mutated JSON and msgpack
  requests, multipart junk, bare frames, scalars) mixed with this file's seeds: valid requests for
  `m` mutated byte-wise and value-wise, and the issue 13 cases (below), verbatim or mutated;
- http (8008), raw TCP: the live HTTP test's stream (random and mutated bodies, odd methods, paths,
  huge and many headers, oversized claims) mixed with mutated request lines and headers, valid
  requests for `m` with mutated JSON bodies, chunked junk, and the issue 13 cases;
- gossip_udp: the live cluster test's datagrams (random, mutated real packets, re-signed, unsigned,
  other versions, oversized, stale facts, replays), a signed ping between batches as a barrier;
- gossip_tcp: its push-pull streams (random, cut, mutated, huge length prefixes, wrong keys);
- peer (ZMTP): random bytes and mutated greetings/READYs on fresh connections, and after a real
  handshake the live test's peer messages (mutated, re-signed, stale, misdirected, replayed,
  unknown ops, bad bodies), a signed PING as a barrier, and mutated ZMTP framing (reserved flags, 2^63 lengths, commands).

Issue 13 cases, as seeds: lone surrogates in names, prompts and stops (JSON escapes; msgpack
surrogatepass bytes), 5,000-deep nested arrays, msgpack length claims of 2^32-1 (msgpack's widest:
a length of 2^63 cannot be written, so 2^63 goes in as an integer value, e.g. max_tokens, n_ctx),
5,000-character paths and names, duplicate JSON keys (the last `action` harmless either way),
n_ctx of 2^20 and 2^63, names with NUL bytes. Loads in the stream name a missing file (a load that
succeeded would start a worker per mutated name); the same cases with the real file are sent once
each at the end (`probes`), each followed by checks (GET /models, GET /metrics, an infer).
Slowloris: a few connections per TCP port send a partial header (HTTP) or greeting and then stall
or trickle; the run reports which the node closed, and when.

Good requests go all along (HTTP and ZMQ infer on `m`, /health, /models, /metrics, a peer PING, a
completion forwarded through another member over the fuzzed peer port) and must all succeed.
`crashes` counts node process deaths and worker restarts (the worker pid of `m` changed);
`rss_growth_pct` is the target node's own RSS from after the warm-up (200 frames per port) to
the end of the fuzz (after the 40 s slowloris hold). It counts what bounded structures take as
they fill under the fuzz's load as well as leaks: the peer replay window holds every request of
the last 30 s (~120 bytes each: 7,700 requests, ~1.2 MB, in the peer phase), and the node hands
freed C-heap pages back to the OS only every 30 s (moc_node/heap_trim.py), so a reading can
fall before or after a trim. `rss_phases` tells them apart: per port, the growth over its whole
phase and over the second half of its phase (RSS read when half its frames were sent), in % of
the RSS after the warm-up. A leak grows in both halves; a structure that fills, or an allocator
high-water mark, shows in the first. `rss_curve` and `rss_b_per_frame_second_half` (bytes per
frame, from the 1 s samples) say the same over time. `--json` prints, last: frames, crashes,
good_request_failures, rss_growth_pct, rss_phases, and per port outcomes, drops by reason,
rates, examples of rare outcomes, slowloris, probes, and the failures each node logged (ERROR
lines, tracebacks).

Every frame comes from `random.Random(f"{seed}:{port}:{index}")` (builders in
bench/fuzz_frames.py): `--show PORT:INDEX` prints a zmq or http frame without a node; gossip and
peer frames also depend on packets captured live and on the clock. Frames that went unanswered, and the last frames of a port when
something failed, are written with their bytes to `fuzz-repro-SEED.json` (in --keep DIR, else cwd).

Usage: python bench/fuzz.py [--quick] [--json] [--seed N] [--frames N] [--ports a,b] [--keep DIR]
       [--no-probes] [--show PORT:INDEX]    (targets 127.0.0.1 only)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import re
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import zmq  # noqa: E402
from fuzz_frames import (  # noqa: E402
    INFER_M,
    LONG,
    MODEL,
    connection_starts,
    frame_rng,
    http_frame,
    peer_plan,
    show,
    zmq_frame,
    zmtp_framing,
    zmtp_raw,
)
from soak import rss_kb  # noqa: E402

from tests.fuzz.test_live_frames import (  # noqa: E402
    decode_reply,
    encode,
    legacy,
)
from tests.integration.gossip_frames import capture  # noqa: E402
from tests.integration.live_cluster import (  # noqa: E402
    FUZZ,
    KEYRING,
    Cluster,
    Member,
    by_label,
    healthy,
    member,
    scrape,
)
from tests.integration.test_live_gossip_datagrams import Pinger, bad_datagram  # noqa: E402
from tests.integration.test_live_gossip_streams import bad_stream  # noqa: E402
from tests.integration.test_live_gossip_streams import exchange as stream_exchange  # noqa: E402
from tests.integration.test_live_peer_frames import (  # noqa: E402
    PeerCaller,
    bad_peer_message,
    forward,
    sealed,
)
from tests.moc_node.cluster_procs import (  # noqa: E402
    NAMES,
    NodeProc,
    complete,
    holders,
    start_cluster,
    wait_until,
)
from transports.peer_wire import MAX_FRAME_BYTES, Kind, Op, PeerWireError, open_frames  # noqa: E402
from transports.zmtp import (  # noqa: E402
    Decoder,
    Ready,
    ZmtpError,
    encode_message,
    greeting,
    ready,
)

PORTS = ("zmq", "http", "gossip_udp", "gossip_tcp", "peer")
FULL_FRAMES = 100_000
QUICK_FRAMES = {"zmq": 5000, "http": 3000, "gossip_udp": 5000, "gossip_tcp": 3000, "peer": 5000}
"""Sized so --quick ends in a minute or two on two busy cores (see the README for rates)."""
WARMUP_FRAMES = 200
REPLY_TIMEOUT_S = 20.0
"""Past this a frame counts as unanswered: a mutated infer may ask for 2048 tokens (seconds)."""
GOOD_INTERVAL_S = 0.2
RSS_EVERY_S = 1.0
CONCURRENCY = {"zmq": 4, "http": 16, "gossip_tcp": 4, "peer": 4}
STALL_S = 2.0
"""An HTTP frame unanswered this long is half-closed (see `http_exchange`)."""
UDP_BATCH, UDP_BATCH_BYTES = 50, 64 * 1024
"""Datagrams between barrier pings: a UDP receive buffer holds ~208 KiB (kernel default)."""
SLOW_HOLD_S = 40.0
"""Past the HTTP body timeout (30 s) and the ZMTP handshake timeout (10 s)."""
RARE = {"closed", "5xx", "internal_error", "timeout", "unanswered", "bad_reply", "bad_status_line", "reset",
        "connect_failed", "left_open_2s"}  # fmt: skip
"""Outcomes whose first few frames are kept as examples in the figures."""
LAST_FRAMES = 20
"""Frames kept per port for the repro file."""


# ---- records --------------------------------------------------------------------------------


@dataclass
class PortRecord:
    """What one port's fuzz did."""

    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    last: deque[tuple[int, bytes]] = field(default_factory=lambda: deque(maxlen=LAST_FRAMES))
    unanswered: list[tuple[int, bytes, str]] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)
    """Outcome -> the first frames (index and bytes, cut) that ended so, for the RARE ones."""


@dataclass
class Run:
    """Shared state of one run: counters updated from several threads under one lock."""

    seed: int
    target: Member
    forwarder: NodeProc
    nodes: dict[str, NodeProc]
    worker_pid: int | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    ports: dict[str, PortRecord] = field(default_factory=lambda: {p: PortRecord() for p in PORTS})
    phase: str = "warmup"
    good: Counter[str] = field(default_factory=Counter)
    good_failures: list[dict[str, Any]] = field(default_factory=list)
    forward_retries: int = 0
    node_deaths: list[str] = field(default_factory=list)
    worker_pids: list[int | None] = field(default_factory=list)
    """Worker pids of `m` seen other than the first (None: the model was not listed)."""
    stop: threading.Event = field(default_factory=threading.Event)
    rss: list[tuple[str, int, int]] = field(default_factory=list)
    rss_at: float = 0.0
    """(phase, frames the phase's port has sent, target node RSS in KiB), every RSS_EVERY_S."""
    half: int = 0
    """Frames into the current phase at which its midpoint RSS is read (0: none)."""
    rss_mid: dict[str, int] = field(default_factory=dict)
    """Port -> the target's RSS in KiB when its phase had sent `half` frames."""

    def record(self, port: str, index: int, data: bytes, outcome: str) -> None:
        with self.lock:
            rec = self.ports[port]
            rec.sent += 1
            if port == self.phase and rec.sent == self.half:
                self.rss_mid[port] = rss_kb(self.target.node.proc.pid)
            rec.outcomes[outcome] += 1
            rec.last.append((index, data))
            if outcome in ("timeout", "unanswered"):
                rec.unanswered.append((index, data, outcome))
            if outcome in RARE and len(rec.examples.setdefault(outcome, [])) < 3:
                rec.examples[outcome].append(f"{index}: {data[:300]!r}")

    def failed(self, kind: str, detail: str) -> None:
        with self.lock:
            self.good_failures.append(
                {"kind": kind, "phase": self.phase, "at": round(time.time(), 3), "detail": detail}
            )

    @property
    def crashed(self) -> bool:
        return bool(self.node_deaths)


# ---- good requests and the watch for deaths and restarts ------------------------------------


def good_requests(run: Run) -> None:
    """Send one good request every GOOD_INTERVAL_S, by turns, until the run stops."""
    target = run.target.node
    ctx: zmq.Context[Any] = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, int(REPLY_TIMEOUT_S * 1000))
    req.setsockopt(zmq.REQ_RELAXED, 1)  # after a timeout the next send is allowed
    req.setsockopt(zmq.REQ_CORRELATE, 1)
    req.connect(f"tcp://127.0.0.1:{zmq_port(target)}")
    caller = PeerCaller(ctx, run.target.peer, run.target.name)

    def zmq_call(action: str, payload: dict[str, Any]) -> None:
        req.send(encode(legacy(action, payload, "good"), "json"))
        reply = decode_reply(req.recv())
        assert reply["success"] is True, reply

    def http_infer() -> None:
        status, body = complete(target, MODEL)
        assert status == 200 and body["choices"][0]["text"] is not None, (status, body)

    def models() -> None:
        pids = {m["name"]: m["pid"] for m in target.get("/models")["models"]}
        pid = pids.get(MODEL)
        with run.lock:
            if pid != run.worker_pid and pid not in run.worker_pids:
                run.worker_pids.append(pid)  # a restart (or the model gone: None)

    def metrics() -> None:
        with urllib.request.urlopen(target.url + "/metrics", timeout=REPLY_TIMEOUT_S) as r:
            assert b"moc_inference_requests_total" in r.read()

    def health() -> None:
        assert target.get("/health", timeout=REPLY_TIMEOUT_S)["status"] != "unhealthy"

    def peer_ping() -> None:
        assert caller.call(Op.PING, None).code == Kind.PONG

    def forwarded() -> None:
        retries = forward(run.forwarder)
        with run.lock:
            run.forward_retries += retries

    kinds: list[tuple[str, Callable[[], None]]] = [
        ("http_infer", http_infer),
        ("zmq_infer", lambda: zmq_call("infer", INFER_M)),
        ("http_health", health),
        ("zmq_health", lambda: zmq_call("health", {})),
        ("list_models", models),
        ("peer_ping", peer_ping),
        ("metrics", metrics),
        ("forwarded_infer", forwarded),
    ]
    try:
        for name, call in itertools.cycle(kinds):
            if run.stop.wait(GOOD_INTERVAL_S):
                return
            watch(run)
            try:
                call()
                with run.lock:
                    run.good[name] += 1
            except (AssertionError, OSError, ValueError, KeyError, zmq.ZMQError) as exc:
                with run.lock:
                    run.good[name] += 1
                run.failed(name, f"{type(exc).__name__}: {str(exc)[:300]}")
    finally:
        caller.sock.close(0)
        req.close(0)
        ctx.term()


def watch(run: Run) -> None:
    """Note any node process that exited; sample the target's RSS every RSS_EVERY_S."""
    last = run.rss[-1] if run.rss else None
    now = time.monotonic()
    if last is None or now - run.rss_at >= RSS_EVERY_S:
        run.rss_at = now
        sent = run.ports[run.phase].sent if run.phase in run.ports else 0
        run.rss.append((run.phase, sent, rss_kb(run.target.node.proc.pid)))
    for name, node in run.nodes.items():
        if not node.running() and name not in run.node_deaths:
            with run.lock:
                run.node_deaths.append(name)
            run.stop.set()


FAILURE_MARKS = (" ERROR ", " CRITICAL ", "Exception in callback", "exception was never retrieved")
_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")


def failure_events(node: NodeProc) -> list[str]:
    """Return the node's logged failures: each ERROR line, and each traceback by the exception
    line that ends it (INFO refusals are not failures), without their timestamps."""
    events = []
    in_traceback = False
    for line in node.log.read_text(errors="replace").splitlines():
        if line.startswith("Traceback"):
            in_traceback = True
        elif in_traceback and not line.startswith((" ", "\t")):
            events.append("traceback: " + line[:200])
            in_traceback = False
        elif any(m in line for m in FAILURE_MARKS):
            events.append(_STAMP.sub("", line)[:200])
    return events


def zmq_port(node: NodeProc) -> int:
    assert node.config is not None
    return int(node.config.read_text().split("zmq_port = ", 1)[1].split()[0])


# ---- the ports ------------------------------------------------------------------------------


def run_threads(run: Run, port: str, indices: Iterator[int], one: Callable[[int], None]) -> None:
    """Call `one(index)` for each index on CONCURRENCY[port] threads; stop with the run."""
    lock = threading.Lock()

    def loop() -> None:
        while not run.stop.is_set():
            with lock:
                index = next(indices, None)
            if index is None:
                return
            one(index)

    with ThreadPoolExecutor(CONCURRENCY[port]) as pool:
        for f in [pool.submit(loop) for _ in range(CONCURRENCY[port])]:
            f.result()


def fuzz_zmq(run: Run, count: int, start: int) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{zmq_port(run.target.node)}"
    local = threading.local()

    def dealer() -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] | None = getattr(local, "sock", None)
        if sock is None:
            sock = local.sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
        return sock

    def one(index: int) -> None:
        frames = zmq_frame(frame_rng(run.seed, "zmq", index), index)
        sock = dealer()
        sock.send_multipart(frames)
        if not sock.poll(int(REPLY_TIMEOUT_S * 1000)):
            sock.close(0)  # a late reply must not be taken for the next frame's
            local.sock = None
            outcome = "unanswered"
        else:
            try:
                reply = decode_reply(sock.recv_multipart()[-1])
                outcome = "ok" if reply["success"] else "refused"
                if reply.get("error_code") == "internal_error":
                    outcome = "internal_error"  # a 500: the node's bug, not the frame's
            except (AssertionError, ValueError, msgpack.UnpackException):
                outcome = "bad_reply"
        run.record("zmq", index, b"\x00".join(frames), outcome)

    try:
        run_threads(run, "zmq", iter(range(start, start + count)), one)
    finally:
        ctx.destroy(0)


async def http_exchange(port: int, raw: bytes) -> str:
    """Send one raw request on its own connection; return its outcome ("2xx".."5xx", ...).

    A frame may promise bytes it never sends (a mutated Content-Length, a chunked body without
    its end): after STALL_S without an answer the client half-closes, as a client that gave up
    would, so the node answers or hangs up at once instead of after its 30 s body timeout.
    """
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return "connect_failed"
    try:
        writer.write(raw)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STALL_S)
        except TimeoutError:
            with contextlib.suppress(OSError):
                writer.write_eof()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REPLY_TIMEOUT_S)
        status = int(head.split(b" ", 2)[1])
        length = _content_length(head)
        # Read the body so the node closes first (no reset in its log, no TIME_WAIT here).
        body = reader.read() if length is None else reader.readexactly(length)
        await asyncio.wait_for(body, REPLY_TIMEOUT_S)
        return f"{status // 100}xx"
    except TimeoutError:
        return "timeout"
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        return "closed"  # refused without a status line, or cut mid-answer
    except (ValueError, IndexError):
        return "bad_status_line"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return None


def fuzz_http(run: Run, count: int, start: int) -> None:
    port = run.target.node.http
    indices = iter(range(start, start + count))

    async def worker() -> None:
        for index in indices:
            if run.stop.is_set():
                return
            raw = http_frame(frame_rng(run.seed, "http", index))
            run.record("http", index, raw, await http_exchange(port, raw))

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY["http"])))

    asyncio.run(main())


def fuzz_gossip_udp(run: Run, count: int, start: int, c: Cluster, captured: list[bytes]) -> None:
    target = run.target
    pinger = Pinger()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setblocking(False)  # replies are never read: the kernel drops them
    in_flight = batch = 0
    try:
        for index in range(start, start + count):
            if run.stop.is_set():
                return
            data = bad_datagram(frame_rng(run.seed, "gossip_udp", index), c, target.name, captured)
            try:
                sender.sendto(data, target.gossip)
                outcome = "sent"
            except OSError:
                outcome = "send_refused"  # over 65,507 bytes: the kernel refuses it
            run.record("gossip_udp", index, data, outcome)
            in_flight += len(data)
            batch += 1
            if batch >= UDP_BATCH or in_flight >= UDP_BATCH_BYTES:
                barrier_ping(run, pinger)
                in_flight = batch = 0
        barrier_ping(run, pinger)
    finally:
        pinger.close()
        sender.close()


def barrier_ping(run: Run, pinger: Pinger) -> None:
    """Ping the target and wait for its ack: every datagram before it has been read."""
    try:
        pinger.ping(run.target)
    except (AssertionError, OSError) as exc:
        run.failed("gossip_ping", f"{type(exc).__name__}: {exc}")
    with run.lock:
        run.good["gossip_ping"] += 1


def fuzz_gossip_tcp(run: Run, count: int, start: int, captured: list[bytes]) -> None:
    def one(index: int) -> None:
        data = bad_stream(frame_rng(run.seed, "gossip_tcp", index), captured)
        try:
            outcome = "answered" if stream_exchange(run.target.gossip, data) else "closed"
        except TimeoutError:
            outcome = "timeout"
        except ConnectionError:
            outcome = "reset"
        run.record("gossip_tcp", index, data, outcome)

    run_threads(run, "gossip_tcp", iter(range(start, start + count)), one)


class ZmtpClient:
    """A raw ZMTP DEALER on a blocking socket: a real handshake, then whatever bytes we like."""

    def __init__(self, port: int, dst: str) -> None:
        self.dst = dst
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT_S)
        self.decoder = Decoder(max_frame_bytes=MAX_FRAME_BYTES)
        self.events: deque[Any] = deque()
        self.taken: list[list[bytes]] = []
        """Frames the node accepted on this connection: what its replays are drawn from."""
        self.sock.sendall(greeting(as_server=False) + ready("DEALER"))
        assert isinstance(self.next_event(), Ready)

    def next_event(self) -> Any:
        while not self.events:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the node closed the connection")
            self.events.extend(self.decoder.feed(data))
        return self.events.popleft()

    def barrier(self) -> int:
        """Send a signed PING and read until its PONG; return the other replies read."""
        frames = sealed(Op.PING, None, dst=self.dst)
        rid = open_frames(KEYRING, frames, time.time(), dst=self.dst).request_id
        self.sock.sendall(encode_message(frames))
        self.taken.append(frames)
        others = 0
        while True:
            event = self.next_event()
            if not isinstance(event, list):
                continue  # a heartbeat PING: not ours to count
            if open_frames(KEYRING, event, time.time(), dst=FUZZ).request_id == rid:
                return others
            others += 1

    def close(self) -> None:
        linger_reset(self.sock)


def linger_reset(sock: socket.socket) -> None:
    """Close with a reset: 100,000 connections must not leave 100,000 TIME_WAITs behind."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def fuzz_peer(run: Run, count: int, start: int) -> None:
    """Per connection: raw bytes (a third of them), or a handshake, up to PEER_BATCH envelope
    messages, a barrier PING, and sometimes a framing mutation to end it."""
    port = run.target.peer

    def raw(index: int, rng: random.Random) -> None:
        data = zmtp_raw(rng)
        sock = socket.create_connection(("127.0.0.1", port), timeout=2.0)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := sock.recv(65536):
                got += chunk
            outcome = "closed"  # greeting (maybe) and then the node hung up
        except TimeoutError:
            outcome = "left_open_2s"  # a partial greeting waits for the handshake timeout
        except ConnectionError:
            outcome = "reset"
        finally:
            linger_reset(sock)
        run.record("peer", index, data, outcome)

    def session(index: int, rng: random.Random, n: int, framing: bool) -> None:
        try:
            client = ZmtpClient(port, run.target.name)
        except (OSError, AssertionError, ZmtpError) as exc:
            run.failed("peer_handshake", f"{type(exc).__name__}: {exc}")
            return
        try:
            for k in range(n):
                frames = bad_peer_message(rng, run.target.name, client.taken)
                client.sock.sendall(encode_message(frames))
                run.record("peer", index + k, b"\x00".join(frames), "sent")
            try:
                client.barrier()
            except (OSError, ZmtpError, PeerWireError) as exc:
                run.failed("peer_barrier", f"{type(exc).__name__}: {exc}")
            if framing:
                data = zmtp_framing(rng, sealed(Op.PING, None, dst=run.target.name))
                with contextlib.suppress(OSError):
                    client.sock.sendall(data)
                run.record("peer", index + n, data, "framing")
        finally:
            client.close()

    def one_connection(index: int) -> None:
        rng = frame_rng(run.seed, "peer", index)
        messages, framing = peer_plan(rng)
        if messages:
            session(index, rng, messages, framing)
        else:
            raw(index, rng)

    run_threads(run, "peer", connection_starts(run.seed, start, count), one_connection)


# ---- slowloris, probes ----------------------------------------------------------------------


@dataclass
class Stall:
    """One connection that sends a partial request and then stalls or trickles."""

    port_name: str
    sock: socket.socket
    trickle: bool
    opened: float
    closed_after_s: float | None = None


def slowloris(run: Run, hold_s: float) -> dict[str, Any]:
    """Hold partial requests open on the HTTP, peer and gossip TCP ports; report who closed them."""
    plans = [("http", run.target.node.http, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: ")] * 5
    plans += [("peer", run.target.peer, greeting(as_server=False)[:20])] * 2
    plans += [("gossip_tcp", run.target.gossip[1], b"\x00\x00")] * 2
    stalls = []
    for i, (name, port, head) in enumerate(plans):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(head)
        sock.setblocking(False)
        stalls.append(Stall(name, sock, trickle=i % 2 == 1, opened=time.monotonic()))
    deadline = time.monotonic() + hold_s
    next_trickle = time.monotonic() + 5
    while time.monotonic() < deadline and not run.stop.is_set():
        now = time.monotonic()
        for s in stalls:
            if s.closed_after_s is not None:
                continue
            try:
                if not s.sock.recv(65536):
                    s.closed_after_s = round(now - s.opened, 1)
                    continue
            except BlockingIOError:
                pass
            except OSError:
                s.closed_after_s = round(now - s.opened, 1)
                continue
            if s.trickle and now >= next_trickle:
                with contextlib.suppress(OSError):
                    s.sock.send(b"a")  # one header byte every 5 s (peer: still no greeting)
        if now >= next_trickle:
            next_trickle = now + 5
        run.stop.wait(0.5)
    report: dict[str, Any] = {"held_s": hold_s}
    for name in ("http", "peer", "gossip_tcp"):
        mine = [s for s in stalls if s.port_name == name]
        closed = [s.closed_after_s for s in mine if s.closed_after_s is not None]
        report[name] = {"connections": len(mine), "closed_by_node": len(closed),
                        "closed_after_s": sorted(closed)}  # fmt: skip
    for s in stalls:
        linger_reset(s.sock)
    return report


def probes(run: Run, model_path: Path) -> list[dict[str, Any]]:
    """Send the issue 13 loads with the real file once each; check the node after each."""
    node = run.target.node
    cases: list[tuple[str, dict[str, Any]]] = [
        ("surrogate_load", {"model_name": "sur\ud800x", "model_path": str(model_path)}),
        ("nul_load", {"model_name": "nul\x00x", "model_path": str(model_path)}),
        ("huge_n_ctx_load", {"model_name": "fuzz-big-ctx", "model_path": str(model_path),
                             "n_ctx": 1 << 20}),
        ("long_name_load", {"model_name": "n" * LONG, "model_path": str(model_path)}),
    ]  # fmt: skip
    out = []
    for case, body in cases:
        t0 = time.monotonic()
        row: dict[str, Any] = {"case": case}
        try:
            status, reply = node.post("/models", body, timeout=REPLY_TIMEOUT_S)
            row["status"] = status
            row["answer"] = str(reply)[:200]
        except (OSError, ValueError) as exc:
            row["status"] = None
            row["answer"] = f"{type(exc).__name__}: {exc}"[:200]
        row["seconds"] = round(time.monotonic() - t0, 2)
        if row["status"] in (200, 201):
            name = urllib.parse.quote(body["model_name"], safe="")
            row["unload"] = _delete(node, "/models/" + name)
        row["after"] = after_checks(node)
        out.append(row)
    return out


def _delete(node: NodeProc, path: str) -> int | str:
    req = urllib.request.Request(node.url + path, method="DELETE")
    try:
        with urllib.request.urlopen(req, timeout=REPLY_TIMEOUT_S) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def after_checks(node: NodeProc) -> dict[str, Any]:
    """Return the status of GET /models, GET /metrics and an infer, right after a probe."""
    out: dict[str, Any] = {}
    for path in ("/models", "/metrics"):
        try:
            with urllib.request.urlopen(node.url + path, timeout=REPLY_TIMEOUT_S) as r:
                out[path] = r.status
        except urllib.error.HTTPError as e:
            out[path] = e.code
        except OSError as exc:
            out[path] = type(exc).__name__
    try:
        out["infer"] = complete(node, MODEL)[0]
    except OSError as exc:
        out["infer"] = type(exc).__name__
    return out


# ---- the run --------------------------------------------------------------------------------


def setup(nodes: dict[str, NodeProc]) -> Cluster:
    """Wait until the members agree, place `m` with one request, and name its holder."""
    members = {n: member(p) for n, p in nodes.items()}
    wait_until(lambda: healthy(Cluster(members, "")), 90, "three alive members, one primary")
    wait_until(lambda: complete(nodes[NAMES[1]])[0] == 200, 90, "model placed and served")
    (holder,) = holders(nodes, MODEL)
    return Cluster(members, holder)


def fuzz_port(run: Run, port: str, count: int, start: int, c: Cluster, captured: list[bytes]) -> None:
    if port == "zmq":
        fuzz_zmq(run, count, start)
    elif port == "http":
        fuzz_http(run, count, start)
    elif port == "gossip_udp":
        fuzz_gossip_udp(run, count, start, c, captured)
    elif port == "gossip_tcp":
        fuzz_gossip_tcp(run, count, start, captured)
    else:
        fuzz_peer(run, count, start)


def second_half_growth(samples: list[tuple[str, int, int]], ports: list[str]) -> dict[str, float]:
    """Return, per port, the RSS bytes gained per frame over the second half of its phase: a
    leak keeps growing there, a high-water mark reached early does not."""
    out = {}
    for port in ports:
        mine = [(sent, kb) for phase, sent, kb in samples if phase == port]
        if len(mine) < 4:
            continue
        (s0, k0), (s1, k1) = mine[len(mine) // 2], mine[-1]
        if s1 > s0:
            out[port] = round((k1 - k0) * 1024 / (s1 - s0), 1)
    return out


def rss_phases(
    at_end: dict[str, int], at_half: dict[str, int], ports: list[str]
) -> dict[str, dict[str, float]]:
    """Return, per port, the target's RSS growth over its whole phase and over the phase's
    second half, both in % of the RSS after the warm-up (the base of `rss_growth_pct`).
    A leak grows in both halves; a bounded structure filling up, or an allocator high-water
    mark, shows in the whole phase but not, or far less, in its second half."""
    base, before, out = at_end["after_warmup"], at_end["after_warmup"], {}
    for port in ports:
        if port not in at_end:
            break
        row = {"whole_pct": pct_of(base, before, at_end[port])}
        if port in at_half:
            row["second_half_pct"] = pct_of(base, at_half[port], at_end[port])
        out[port] = row
        before = at_end[port]
    return out


def pct_of(base: int, start: int, end: int) -> float:
    return round((end - start) / base * 100.0, 2) if base else 0.0


def pct(start: int, end: int) -> float:
    return round((end - start) / start * 100.0, 2) if start else 0.0


def machine() -> str:
    model = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    return f"{os.cpu_count()} CPUs, {model}"


def fuzz(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    ports = [p for p in PORTS if p in args.ports.split(",")]
    count = args.frames or (FULL_FRAMES if not args.quick else None)
    t_start = time.monotonic()
    with start_cluster(root) as nodes:
        c = setup(nodes)
        target = c.members[c.holder]
        forwarder = next(n for name, n in nodes.items() if name != c.holder)
        pid = next(m["pid"] for m in target.node.get("/models")["models"] if m["name"] == MODEL)
        run = Run(args.seed, target, forwarder, nodes, pid)
        captured = capture(c)
        logged = {name: len(failure_events(n)) for name, n in nodes.items()}
        good = threading.Thread(target=good_requests, args=(run,), daemon=True)
        good.start()
        for port in ports:  # warm-up: the first allocations of every code path
            fuzz_port(run, port, WARMUP_FRAMES, 0, c, captured)
        rss_start = rss_kb(target.node.proc.pid)
        warm_up = run.ports
        rss_by_phase = {"after_warmup": rss_start}
        run.ports = {p: PortRecord() for p in PORTS}
        drops_before = scrape(target.node)
        slow_result: dict[str, Any] = {}
        slow = threading.Thread(
            target=lambda: slow_result.update(slowloris(run, SLOW_HOLD_S)),
            daemon=True,
        )
        slow.start()
        for port in ports:
            if run.stop.is_set():
                break
            n = count or QUICK_FRAMES[port]
            run.half = n // 2
            run.phase = port
            t0 = time.monotonic()
            fuzz_port(run, port, n, WARMUP_FRAMES, c, captured)
            run.ports[port].seconds = round(time.monotonic() - t0, 1)
            rss_by_phase[port] = rss_kb(target.node.proc.pid)
            print(f"  {port}: {run.ports[port].sent} frames in "
                  f"{run.ports[port].seconds} s", file=sys.stderr, flush=True)  # fmt: skip
        slow.join()
        run.phase = "end"
        rss_end = rss_kb(target.node.proc.pid) if target.node.running() else 0
        after = scrape(target.node) if target.node.running() else drops_before
        probe_rows: list[dict[str, Any]] = []
        if not args.no_probes and not run.stop.is_set():
            run.phase = "probes"
            probe_rows = probes(run, root / "models" / f"{MODEL}.gguf")
        rss_final = rss_kb(target.node.proc.pid) if target.node.running() else 0
        run.stop.set()
        good.join(timeout=REPLY_TIMEOUT_S * 3)
        watch(run)
        failures = {name: failure_events(n)[logged[name] :] for name, n in nodes.items()}
        restarts = [p for p in run.worker_pids if p is not None]
        gone = run.worker_pids.count(None)
    frames = {p: run.ports[p].sent for p in ports}
    figures: dict[str, Any] = {
        "seed": args.seed,
        "quick": args.quick,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "frames": frames,
        "crashes": len(run.node_deaths) + len(restarts),
        "good_request_failures": len(run.good_failures),
        "rss_growth_pct": pct(rss_start, rss_end),
        "rss_phases": rss_phases(rss_by_phase, run.rss_mid, ports),
        "node_deaths": run.node_deaths,
        "worker_restarts": len(restarts),
        "model_gone_observed": gone,
        "good_requests": dict(run.good),
        "good_failure_examples": run.good_failures[:10],
        "forward_retries": run.forward_retries,
        "outcomes": {p: dict(run.ports[p].outcomes) for p in ports},
        "unanswered": {p: len(run.ports[p].unanswered) for p in ports},
        "examples": {p: run.ports[p].examples for p in ports if run.ports[p].examples},
        "warmup_outcomes": {p: dict(warm_up[p].outcomes) for p in ports},
        "frames_per_s": {p: round(frames[p] / run.ports[p].seconds) for p in ports
                         if run.ports[p].seconds},  # fmt: skip
        "gossip_drops": dict(
            by_label(after, "moc_gossip_messages_dropped_total")
            - by_label(drops_before, "moc_gossip_messages_dropped_total")
        ),
        "peer_drops": dict(
            by_label(after, "moc_peer_messages_dropped_total")
            - by_label(drops_before, "moc_peer_messages_dropped_total")
        ),
        "rss_kb": {**rss_by_phase, "end": rss_end, "after_probes": rss_final},
        "rss_b_per_frame_second_half": second_half_growth(run.rss, ports),
        "rss_curve": run.rss[:: max(1, len(run.rss) // 40)],
        "slowloris": slow_result,
        "probes": probe_rows,
        "failures_logged": {name: len(events) for name, events in failures.items()},
        "failure_kinds": [
            [name, event, n]
            for name, events in failures.items()
            for event, n in Counter(events).most_common(6)
        ],
        "seconds": round(time.monotonic() - t_start, 1),
    }
    write_repro(args, run, root, figures)
    return figures


def write_repro(args: argparse.Namespace, run: Run, root: Path, figures: dict[str, Any]) -> None:
    """Write unanswered frames, and every port's last frames when anything failed."""
    trouble = figures["crashes"] or figures["good_request_failures"] or any(
        figures["unanswered"].values()
    )
    if not trouble:
        return
    out = {
        "seed": run.seed,
        "unanswered": {p: [(i, d.hex()) for i, d, _ in r.unanswered[:50]]
                       for p, r in run.ports.items()},  # fmt: skip
        "last_frames": {p: [(i, d[:4096].hex()) for i, d in r.last] for p, r in run.ports.items()},
        "good_failures": run.good_failures,
    }
    path = (Path(args.keep) if args.keep else Path.cwd()) / f"fuzz-repro-{run.seed}.json"
    path.write_text(json.dumps(out, indent=1))
    figures["repro_file"] = str(path)


GOALS = {"crashes": 0, "good_request_failures": 0, "rss_growth_pct": 5.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few thousand frames per port")
    parser.add_argument("--json", action="store_true", help="print the figures as the last line")
    parser.add_argument("--seed", type=int, default=None, help="default: a new random seed")
    parser.add_argument("--frames", type=int, help="frames per port (default 100,000)")
    parser.add_argument("--ports", default=",".join(PORTS), help="which ports, comma-separated")
    parser.add_argument("--keep", help="keep configs and node logs in this directory")
    parser.add_argument("--no-probes", action="store_true", help="skip the real-file load probes")
    parser.add_argument("--show", metavar="PORT:INDEX", help="print one zmq or http frame, exit")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    if args.show:
        sys.stdout.buffer.write(show(args.seed, args.show) + b"\n")
        return 0
    print(f"seed {args.seed}", flush=True)
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        figures = fuzz(args, Path(args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="moc-fuzz-") as tmp:
            figures = fuzz(args, Path(tmp))
    print_report(figures)
    if args.json:
        print(json.dumps(figures))
    met = (
        figures["crashes"] == 0
        and figures["good_request_failures"] == 0
        and figures["rss_growth_pct"] <= GOALS["rss_growth_pct"]
    )
    return 0 if met else 1


def print_report(f: dict[str, Any]) -> None:
    print(f"seed {f['seed']}  {f['machine']}  {f['date']}  {f['seconds']} s")
    print(f"{'port':<12}{'frames':>9}{'frames/s':>10}  outcomes")
    for port, n in f["frames"].items():
        rate = f["frames_per_s"].get(port, "-")
        print(f"{port:<12}{n:>9}{rate:>10}  {f['outcomes'][port]}")
    print(f"gossip drops {f['gossip_drops']}")
    print(f"peer drops {f['peer_drops']}")
    print(f"crashes {f['crashes']} (node deaths {f['node_deaths']}, worker restarts "
          f"{f['worker_restarts']})  good requests {sum(f['good_requests'].values())}, "
          f"failed {f['good_request_failures']}  RSS {f['rss_kb']} KiB, "
          f"growth {f['rss_growth_pct']} %")  # fmt: skip
    print(f"RSS growth per phase, % of the RSS after the warm-up: {f['rss_phases']}")
    for row in f["good_failure_examples"]:
        print(f"  good failure: {row}")
    print(f"slowloris {f['slowloris']}")
    for row in f["probes"]:
        print(f"probe {row}")
    print(f"failures logged (ERROR lines and tracebacks) {f['failures_logged']}")
    for name, event, n in f["failure_kinds"]:
        print(f"  {name} x{n}: {event}")


if __name__ == "__main__":
    raise SystemExit(main())
