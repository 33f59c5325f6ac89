"""The HTTP front (aiohttp): the app and the server that runs it.

Routes: legacy REST (`transports.http_rest`), the OpenAI-compatible API (`transports.http_openai`),
the cluster page's static files. Middlewares (`transports.http_middleware`) count, shape errors and
check keys; `transports.http_guard` bounds connections and slow request heads.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from aiohttp import web

from transports import http_openai, http_rest
from transports.api import NodeAPI
from transports.config import ServerConfig, load_api_keys
from transports.dispatch import Dispatcher
from transports.http_bodies import CONFIG_KEY, DISPATCHER_KEY
from transports.http_guard import GuardedSite, connection_middleware
from transports.http_middleware import (
    RefusalCounter,
    auth_middleware,
    error_middleware,
    metrics_middleware,
)

__all__ = ["HttpServer", "build_app", "serve_http"]

log = logging.getLogger(__name__)


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
            metrics_middleware,
            error_middleware,
            auth_middleware(keys, config),
        ],
    )
    app[DISPATCHER_KEY] = dispatcher or Dispatcher(node, config)
    app[CONFIG_KEY] = config
    http_rest.add_routes(app.router)
    if static_dir is not None:
        index = static_dir / "index.html"

        async def _index(request: web.Request) -> web.FileResponse:
            return web.FileResponse(index)

        app.router.add_get("/", _index)
        app.router.add_static("/static/", static_dir)
    http_openai.add_routes(app.router)
    return app


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
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`ssl_context` (see `transports.tls.ssl_context`): serve HTTPS only; None: plain HTTP."""
        self.app = build_app(
            node, config, dispatcher=dispatcher, api_keys=api_keys, static_dir=static_dir
        )
        self._config = config
        self._ssl_context = ssl_context
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
            tls=self._ssl_context,
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
        scheme = "HTTP" if self._ssl_context is None else "HTTPS"
        log.info("%s server listening on %s:%d", scheme, self._config.host, self.port)

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
