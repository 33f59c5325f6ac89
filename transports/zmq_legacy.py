"""The legacy ZeroMQ front: a ROUTER socket on the asyncio loop serving REQ clients.

Wire contract (DESIGN §4): `transports.zmq_codec`. Every request is answered when a reply is
possible (bad input included), counted in `moc_zmq_requests_total{action,outcome}`, and nothing a
peer sends stops the server.

Who may call (see transports/zmq_auth.py): a ZAP handler checks each connection against an
address allow-list and, with CURVE on, the client's key; a request may carry `api_key` beside
`action`, checked against the API keys (a wrong key is always refused; `zmq_require_api_key`
refuses a missing one except for `health`). With API keys set and none of these configured, the
port binds loopback only. Refusals answer `unauthorized` and are counted.

The socket is read from the event loop's descriptor callback (transports/loop_socket.py), replies go
out with non-blocking sends. Bad frames, and actions with a view (health, status, list_models),
are answered inside that callback; every other action may wait and runs as a task, at most
`max_workers` at once with `max_pending` more waiting, so a slow inference never delays a health
check from another client and a burst of job queries cannot hold every executor thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

import zmq
import zmq.asyncio

from actors.errors import Overloaded
from transports.api import NodeAPI
from transports.auth import KeyRing, client_error, public_health
from transports.config import ServerConfig, ZmqAuth, load_api_keys, load_zmq_auth
from transports.dispatch import Dispatcher
from transports.errors import BadFrame, ErrorReply, PayloadTooLarge, classify
from transports.loop_socket import LoopSocket
from transports.metrics import IN_FLIGHT, ZmqRecorder
from transports.zmq_auth import ZAP_DOMAIN, HandshakeMonitor, ZapHandler, bind_host
from transports.zmq_codec import (
    NO_ACTION,
    Encoding,
    Request,
    action_label,
    check_key,
    decode_frame,
    echo_id,
    encode_reply,
    error_reply,
    guess_encoding,
    parse_request,
    split_envelope,
    success_reply,
)

__all__ = ["serve_zmq", "ZmqServer"]

log = logging.getLogger(__name__)

class ZmqServer:
    """Serve the legacy actions on a ROUTER socket until stopped."""

    def __init__(
        self,
        node: NodeAPI,
        config: ServerConfig,
        *,
        dispatcher: Dispatcher | None = None,
        context: zmq.asyncio.Context | None = None,
        api_keys: frozenset[str] | None = None,
        zmq_auth: ZmqAuth | None = None,
    ) -> None:
        self._dispatcher = dispatcher or Dispatcher(node, config)
        self._config = config
        self._keys = KeyRing(load_api_keys(config) if api_keys is None else api_keys)
        self._auth = load_zmq_auth(config) if zmq_auth is None else zmq_auth
        self._zap: ZapHandler | None = None
        self._monitor: HandshakeMonitor | None = None
        self._own_context = context is None
        self._context = context if context is not None else zmq.asyncio.Context()
        self._socket: LoopSocket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._workers = asyncio.Semaphore(config.max_workers)
        self._pending = 0
        self._stopping = False  # take no new requests; replies to those in flight still go out
        self._recorder = ZmqRecorder()
        self._in_flight = IN_FLIGHT.labels(transport="zmq")
        self.endpoint = ""

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful when the config asked for port 0)."""
        return int(self.endpoint.rsplit(":", 1)[1])

    async def start(self) -> None:
        """Bind the socket and start serving."""
        # A plain-API view of the (asyncio) context: same io thread, no futures per message.
        plain: zmq.Context[Any] = zmq.Context.shadow(self._context.underlying)
        config, auth = self._config, self._auth
        if auth.needs_zap:  # bound before the server socket, so no peer slips in unasked
            self._zap = ZapHandler(plain, auth)
        sock: zmq.Socket[bytes] = plain.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # libzmq drops a peer whose message exceeds this, without buffering it.
        sock.setsockopt(zmq.MAXMSGSIZE, config.zmq_max_msg_bytes)
        # ... and one that has not finished its handshake (a partial greeting) by then.
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(config.zmq_handshake_timeout_s * 1000))
        if auth.needs_zap:
            sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        if auth.curve_secret_key is not None:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, auth.curve_secret_key)
        host = bind_host(
            config.host,
            keys_configured=bool(self._keys),
            zmq_auth_configured=config.zmq_auth_configured,
        )
        if host != config.host:
            log.warning(
                "API keys are set but the ZeroMQ port has no authentication, so it listens on "
                "%s only (not %s); to open it to the network set server.zmq_allow_from "
                "(the agents' addresses), server.zmq_curve_secret_key_file, or "
                "server.zmq_require_api_key",
                host,
                config.host,
            )
        elif not self._keys and not config.zmq_auth_configured:
            log.warning("no API keys and no ZeroMQ auth: the ZeroMQ port is open (dev only)")
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
            host = f"[{host}]"
        port = config.zmq_port or "*"
        try:
            sock.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError:
            sock.close(linger=0)
            self._close_auth()
            raise
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._monitor = HandshakeMonitor(sock)
        self._socket = LoopSocket(sock, self._on_frames)
        log.info("legacy ZeroMQ server listening on %s", self.endpoint)
        if auth.curve_public_key is not None:
            log.info("ZeroMQ CURVE public key (give it to agents): %s", auth.curve_public_key)

    async def stop(self) -> None:
        """Stop reading, let in-flight requests finish within the grace period, then close."""
        self._stopping = True
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=self._config.shutdown_timeout_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._close_auth()
        if self._own_context:
            self._context.term()

    def _close_auth(self) -> None:
        if self._zap is not None:
            self._zap.close()
            self._zap = None

    async def __aenter__(self) -> ZmqServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _on_frames(self, frames: list[bytes]) -> None:
        if self._stopping:
            return  # take nothing new
        try:
            self._on_message(frames, time.perf_counter())
        except Exception:
            # A bug in handling one message must not stop the server for everyone else.
            log.exception("failed to handle a ZeroMQ message")

    def _on_message(self, frames: list[bytes], t0: float) -> None:
        envelope, body = split_envelope(frames)
        if len(body) != 1:
            encoding = guess_encoding(body[0]) if body else "json"
            error = BadFrame(f"expected one body frame, got {len(body)}")
            self._answer(envelope, encoding, NO_ACTION, None, t0, error=error)
            return
        frame = body[0]
        if len(frame) > self._config.max_frame_bytes:
            too_large = PayloadTooLarge(
                f"frame of {len(frame)} bytes exceeds the limit of {self._config.max_frame_bytes}"
            )
            self._answer(envelope, guess_encoding(frame), NO_ACTION, None, t0, error=too_large)
            return
        try:
            encoding, obj = decode_frame(frame)
        except BadFrame as exc:
            self._answer(envelope, guess_encoding(frame), NO_ACTION, None, t0, error=exc)
            return
        label = action_label(obj)
        authenticated, refusal = check_key(obj, self._keys, self._config.zmq_require_api_key)
        if refusal is not None:
            request_id = echo_id(obj.get("request_id"), encoding)
            self._answer(envelope, encoding, label, request_id, t0, error=refusal)
            return
        request_id, parsed = parse_request(obj, encoding)
        if isinstance(parsed, BaseException):
            self._answer(envelope, encoding, label, request_id, t0, error=parsed)
            return
        view = parsed.action.view
        if view is not None:  # answered from the node's state: right here, no task
            try:
                result = view(self._dispatcher, parsed.payload)
                if parsed.action.name == "health" and not authenticated:
                    result = public_health(result)
            except Exception as exc:
                self._answer(envelope, encoding, label, request_id, t0, error=exc)
            else:
                self._answer(envelope, encoding, label, request_id, t0, result=result)
            return
        if self._pending >= self._config.max_workers + self._config.max_pending:
            busy = Overloaded("too many ZeroMQ requests in progress", retry_after=1.0)
            self._answer(envelope, encoding, label, request_id, t0, error=busy)
            return
        self._pending += 1
        self._spawn(self._bounded(envelope, encoding, label, parsed, t0))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _bounded(
        self, envelope: list[bytes], encoding: Encoding, label: str, req: Request, t0: float
    ) -> None:
        self._in_flight.inc()
        try:
            async with self._workers:
                await self._execute(envelope, encoding, label, req, t0)
        finally:
            self._pending -= 1
            self._in_flight.dec()

    async def _execute(
        self, envelope: list[bytes], encoding: Encoding, label: str, req: Request, t0: float
    ) -> None:
        try:
            result = await req.action.handler(self._dispatcher, req.payload)
        except Exception as exc:
            self._answer(envelope, encoding, label, req.request_id, t0, error=exc)
        else:
            self._answer(envelope, encoding, label, req.request_id, t0, result=result)

    def _answer(
        self,
        envelope: list[bytes],
        encoding: Encoding,
        label: str,
        request_id: Any,
        t0: float,
        *,
        result: Any = None,
        error: BaseException | None = None,
    ) -> None:
        latency_ms = (time.perf_counter() - t0) * 1000.0
        if error is None:
            reply = success_reply(result, request_id, latency_ms)
            outcome = "ok"
        else:
            err = client_error(classify(error))
            reply = error_reply(err, request_id, latency_ms)
            outcome = err.code
        try:
            data = encode_reply(reply, encoding)
        except (TypeError, ValueError, OverflowError):
            log.exception("cannot encode the reply to action %s", label)
            err = ErrorReply(500, "internal_error", "internal error: reply not encodable")
            data = encode_reply(error_reply(err, None, latency_ms), encoding)
            outcome = err.code
        self._recorder.record(label, outcome, time.perf_counter() - t0)
        if self._socket is None:
            return
        try:
            self._socket.send([*envelope, data])
        except zmq.ZMQError as exc:
            # The peer may be gone; that costs it its reply, never the server.
            log.debug("ZeroMQ reply not sent: %s", exc)


async def serve_zmq(
    node: NodeAPI,
    config: ServerConfig,
    *,
    dispatcher: Dispatcher | None = None,
    api_keys: frozenset[str] | None = None,
) -> ZmqServer:
    """Start the legacy ZeroMQ server for `node`; call `await server.stop()` to end it."""
    server = ZmqServer(node, config, dispatcher=dispatcher, api_keys=api_keys)
    await server.start()
    return server
