"""HTTP connections: a cap per client address and a deadline for each request head.

aiohttp reads a request head for as long as the client takes (its keep-alive timer, which is
all that bounds a stalled head, defaults to an hour), and takes any number of connections from
one address. `GuardedConnection` wraps aiohttp's protocol for each connection: it refuses a
connection over the per-address cap with a 503 before aiohttp sees it, and closes one that has
not delivered a complete head within `header_read_timeout_s` of connecting, or of the first
byte of its next request. The app tells it when a head is complete (the middleware runs only
then) and when the request is over. Each refusal is counted by reason.

Over TLS the guard sits below the handshake: the cap counts TCP connections, the head deadline
runs from the TCP connect (a client that stalls its handshake is closed like one that stalls its
head), and a handshake that fails (a plain-text request, a client certificate missing or not
signed by the client CA) is closed and counted as `tls_handshake`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web

from transports.metrics import HTTP_CONNECTIONS_REFUSED

__all__ = [
    "HEADER_TIMEOUT",
    "TLS_HANDSHAKE",
    "TOO_MANY",
    "TOO_MANY_RESPONSE",
    "AddressCounts",
    "connection_middleware",
    "GuardedConnection",
    "GuardedSite",
    "peer_address",
    "refusal_response",
]

log = logging.getLogger(__name__)

TOO_MANY = "too_many_connections"
HEADER_TIMEOUT = "header_timeout"
TLS_HANDSHAKE = "tls_handshake"


class AddressCounts:
    """Open connections per client address, within a cap (0: no cap)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def admit(self, address: str) -> bool:
        """Count one more connection from `address`; False (and nothing counted) past the cap."""
        held = self._open.get(address, 0)
        if self.limit and held >= self.limit:
            return False
        self._open[address] = held + 1
        return True

    def release(self, address: str) -> None:
        """Forget one connection from `address` (an address with none left is dropped)."""
        held = self._open.get(address, 0) - 1
        if held > 0:
            self._open[address] = held
        else:
            self._open.pop(address, None)

    def held(self, address: str) -> int:
        """Return how many connections `address` holds now."""
        return self._open.get(address, 0)


def refusal_response(status: str, code: str, message: str, retry_after: int) -> bytes:
    """Return a complete HTTP/1.1 response that closes the connection (legacy error body)."""
    body = json.dumps(
        {"success": False, "error": message, "code": code, "detail": message},
        separators=(",", ":"),
    ).encode()
    head = (
        f"HTTP/1.1 {status}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {retry_after}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


TOO_MANY_RESPONSE = refusal_response(
    "503 Service Unavailable", TOO_MANY, "too many connections from this address", 1
)


def peer_address(transport: asyncio.BaseTransport) -> str:
    """Return the client's IP address as a string ("unknown" when the socket has none)."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "unknown"


class GuardedConnection(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the address cap and the head deadline."""

    def __init__(
        self,
        make_inner: Callable[[], asyncio.Protocol],
        counts: AddressCounts,
        header_timeout_s: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._make_inner = make_inner
        self._counts = counts
        self._header_timeout_s = header_timeout_s
        self._tls = tls
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._address = ""
        self._admitted = False
        self._deadline: asyncio.TimerHandle | None = None
        self._in_request = False
        self._handshake: asyncio.Task[None] | None = None
        self._early: list[bytes] = []
        """Bytes decrypted right after the handshake, before aiohttp's protocol is made."""

    # ---- asyncio.Protocol, forwarded to aiohttp's once admitted ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the connection (or answer 503 and close it) and start the head deadline."""
        transport = cast(asyncio.Transport, transport)  # a stream transport (uvloop's too)
        address = peer_address(transport)
        if not self._counts.admit(address):
            HTTP_CONNECTIONS_REFUSED.labels(reason=TOO_MANY).inc()
            log.debug("HTTP connection from %s refused: over the per-address cap", address)
            if self._tls is None:  # a TLS client could not read a plain-text answer
                transport.write(TOO_MANY_RESPONSE)
            transport.close()
            return
        self._address = address
        self._admitted = True
        self._transport = transport
        self._arm()
        if self._tls is None:
            self._serve(transport)
            return
        # Nothing is read until the handshake owns the socket (start_tls resumes reading).
        transport.pause_reading()
        self._handshake = asyncio.get_running_loop().create_task(self._start_tls(transport))

    def _serve(self, transport: asyncio.Transport) -> None:
        """Hand the connection (decrypted, over TLS) to aiohttp's protocol."""
        self._transport = transport
        self._inner = self._make_inner()
        self._inner.connection_made(transport)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    async def _start_tls(self, transport: asyncio.Transport) -> None:
        """Run the server side of the handshake; a failed one is closed and counted."""
        loop = asyncio.get_running_loop()
        assert self._tls is not None
        try:
            # The head deadline (armed at connect) also bounds the handshake: no timer of its own
            # beyond asyncio's, set to the same length.
            tls_transport = await loop.start_tls(
                transport,
                self,
                self._tls,
                server_side=True,
                ssl_handshake_timeout=self._header_timeout_s,
            )
        except asyncio.CancelledError:
            self._release()  # the head deadline closed it (and counted it), or the server stops
            raise
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            HTTP_CONNECTIONS_REFUSED.labels(reason=TLS_HANDSHAKE).inc()
            log.debug(
                "HTTP connection from %s closed: TLS handshake failed: %s", self._address, exc
            )
            self._disarm()
            self._release()
            transport.close()
            return
        finally:
            self._handshake = None
        if tls_transport is None or self._transport is None:  # lost as the handshake ended
            self._disarm()
            self._release()
            transport.close()
            return
        self._serve(tls_transport)

    def _release(self) -> None:
        """Give the address's slot back, once."""
        if self._admitted:
            self._admitted = False
            self._counts.release(self._address)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        """Pass bytes on; the first byte of a new request head starts its deadline."""
        if self._inner is None:
            if self._handshake is not None:  # decrypted before _serve ran: keep them for it
                self._early.append(data)
            return
        if not self._in_request and self._deadline is None:
            self._arm()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        """Pass the client's EOF on."""
        return None if self._inner is None else self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        """Release the address's slot and let aiohttp clean up."""
        self._disarm()
        self._release()
        if self._inner is None:
            return
        inner, self._inner = self._inner, None
        inner.connection_lost(exc)

    def pause_writing(self) -> None:
        """Pass flow control on."""
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        """Pass flow control on."""
        if self._inner is not None:
            self._inner.resume_writing()

    # ---- told by the app ----

    def request_started(self) -> None:
        """A complete head came and its request is being handled: no deadline until it ends."""
        self._in_request = True
        self._disarm()

    def request_finished(self) -> None:
        """The request is handled; the next head's first byte starts a new deadline (an idle
        kept-alive connection is aiohttp's keepalive_timeout's business)."""
        self._in_request = False

    # ---- the deadline ----

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self._in_request or self._transport is None:
            return
        HTTP_CONNECTIONS_REFUSED.labels(reason=HEADER_TIMEOUT).inc()
        log.debug("HTTP connection from %s closed: no complete request head", self._address)
        if self._handshake is not None:  # still in the TLS handshake: start_tls closes it
            self._handshake.cancel()
            return
        # Closed without a reply, as nginx and Go do: a 408 here could be read by a client as
        # the answer to a request it is sending on a connection it thinks idle.
        self._transport.close()


@web.middleware
async def connection_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Tell the connection's guard that a head is complete and when its request ends."""
    transport = request.transport
    conn = transport.get_protocol() if transport is not None else None
    if not isinstance(conn, GuardedConnection):
        return await handler(request)  # type: ignore[no-any-return]
    conn.request_started()
    try:
        return await handler(request)  # type: ignore[no-any-return]
    finally:
        conn.request_finished()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through `GuardedConnection` (else as aiohttp's TCPSite)."""

    __slots__ = ("_host", "_port", "_counts", "_header_timeout_s", "_tls")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None,
        port: int,
        *,
        max_connections_per_ip: int,
        header_read_timeout_s: float,
        tls: ssl.SSLContext | None = None,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._counts = AddressCounts(max_connections_per_ip)
        self._header_timeout_s = header_read_timeout_s
        self._tls = tls

    @property
    def name(self) -> str:
        """Return the site's URL, as aiohttp names sites in its logs."""
        scheme = "http" if self._tls is None else "https"
        return f"{scheme}://{self._host or '0.0.0.0'}:{self._port}"

    @property
    def counts(self) -> AddressCounts:
        """The open connections per address (for tests and status)."""
        return self._counts

    async def start(self) -> None:
        """Listen, wrapping each connection's aiohttp protocol."""
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: GuardedConnection(server, self._counts, self._header_timeout_s, self._tls),
            self._host,
            self._port,
            backlog=self._backlog,
        )
