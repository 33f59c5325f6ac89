"""Wiring: build the actors and the Node from a Config, serve the transports, handle signals.

The only place where production objects are chosen; everything else takes them as arguments.
Here, once, the node is chosen: a LocalNode, or a ClusteredNode around it when `[cluster]
enabled`; the fronts, the watchdog and the learning/goal services get whichever it is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import signal
import tempfile
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pykka

from actors.serving.board import ModelBoard
from actors.serving.config import CatalogEntry
from actors.serving.gpu import GPUActor
from actors.serving.ledger import Budget, Ledger
from actors.serving.manager import ManagerDeps, ModelManager
from actors.serving.memory_watch import MemoryWatch
from actors.serving.model import worker_process
from actors.serving.probes import discover
from actors.serving.resilience import BulkheadRegistry
from actors.serving.store import StateStore
from actors.serving.ticker import Ticker
from actors.types import LoadRequest
from actors.worker.handle import WorkerFactory
from cluster.keyring import Keyring
from moc_node.clustered.node import ClusteredNode
from moc_node.config import Config, ConfigError, load_config
from moc_node.heap_trim import TRIM_INTERVAL_S, heap_trimmer
from moc_node.node import LocalNode, Node
from moc_node.preflight import Keys, Listener, check, listen, listener, preflight
from moc_node.proxies import DeviceProxy, ManagerProxy, typed
from moc_node.sdnotify import Notifier, watchdog
from moc_node.services import Deploy, Services, learning_output_dir, start_services
from moc_node.term_store import TermStore
from moc_node.witness import serve_witness

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"


class Server(Protocol):
    """A transport the app starts after the node is built and stops before the node closes."""

    @property
    def port(self) -> int:
        """The TCP port bound once started (the config may ask for 0: any free port)."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Front:
    """A transport and the listener it binds, named when the bind fails."""

    server: Server
    listener: Listener


@dataclass
class Runtime:
    """A built node with everything that must be stopped with it.

    `node` is what the fronts serve: the LocalNode, or with `[cluster] enabled` the
    ClusteredNode around it (also in `clustered`), chosen once in `build_runtime`.
    """

    config: Config
    node: Node
    manager: ManagerProxy
    store: StateStore
    tickers: list[Ticker] = field(default_factory=list)
    runtime_dir: Path | None = None
    clustered: ClusteredNode | None = None
    services: Services | None = None

    async def join_cluster(self, http_port: int, zmq_port: int) -> None:
        """Start the peer RPC and gossip, advertising these client ports (when clustered).

        A port that cannot be bound is a ConfigError naming its key.
        """
        if self.clustered is None:
            return
        self.clustered.advertise(http_port, zmq_port)
        # ClusteredNode.join, one listener at a time, so that a failed bind names its key.
        await listen(listener(self.config, "cluster.peer_port"), self.clustered.server.start)
        await listen(listener(self.config, "cluster.bind"), self.clustered.link.start)

    async def leave_cluster(self) -> None:
        """Announce the leave (peers stop routing here), after the drain has begun."""
        if self.clustered is not None:
            await self.clustered.leave()

    async def close(self) -> None:
        """Unload the models (remembering them), stop the actors and timers."""
        if self.clustered is not None:
            await self.clustered.stop_cluster()
        if self.services is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.services.stop)
            self.services = None
        for ticker in self.tickers:
            ticker.stop()
        await self.node.close()
        if self.runtime_dir is not None:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def reload(self, config: Config) -> None:
        """Adopt a new catalog and keep_alive (SIGHUP)."""
        self.manager.reconfigure(config.models)  # not awaited: the loop never blocks
        self.config = dataclasses.replace(self.config, models=config.models)


def build_runtime(
    config: Config,
    *,
    keyring: Keyring | None = None,
    worker_factory: WorkerFactory = worker_process,
) -> Runtime:
    """Start the actors for `config` and return the Node over them.

    With `[cluster] enabled` the node is a ClusteredNode, sealing peer traffic with `keyring`
    (the preflight's; None: unauthenticated); it joins in `Runtime.join_cluster`.
    """
    state = config.node.state_path
    state.mkdir(parents=True, exist_ok=True)
    (state / "models").mkdir(exist_ok=True)
    # ipc:// socket paths must stay under ~100 bytes, so the workers' sockets live in /tmp.
    runtime_dir = Path(tempfile.mkdtemp(prefix="moc-node-"))
    resources = config.resources
    budget = Budget(
        resources.reserve_mb, resources.eviction_threshold_pct, resources.vram_soft_limit_mb
    )
    probes = discover(resources)
    ledgers = {p.name: Ledger(p.name, p.kind, budget, p.read()) for p in probes}
    gpu_refs = [GPUActor.start(p, ledgers[p.name]) for p in probes]
    store = StateStore(state / "moc-node.db")
    board = ModelBoard()
    bulkheads = BulkheadRegistry(config.resilience.bulkhead)
    abort = threading.Event()
    manager = ModelManager.start(
        ManagerDeps(
            models=config.models,
            ledgers=ledgers,
            device_index={p.name: p.index for p in probes},
            # Models that learning jobs write are servable too.
            model_dirs=(*config.node.model_paths, learning_output_dir(config)),
            store=store,
            bulkheads=bulkheads,
            breaker=config.resilience.circuit_breaker,
            runtime_dir=runtime_dir,
            board=board,
            abort=abort,
            probes={p.name: p for p in probes},
            worker_factory=worker_factory,
            memory_watch=MemoryWatch(resources.gpu_poll_interval, resources.worker_memory_limit_mb),
            cpu_threads=resources.cpu_threads,
            worker_nice=resources.worker_nice,
            huge_pages=resources.huge_pages,
        )
    )
    gpu_proxies = [typed(ref, DeviceProxy) for ref in gpu_refs]
    manager_proxy = typed(manager, ManagerProxy)
    tickers = [
        Ticker(resources.gpu_poll_interval, lambda: _poll_all(gpu_proxies), "gpu-poll").start(),
        Ticker(1.0, lambda: _tell(manager_proxy.expire_idle()), "keep-alive").start(),
    ]
    trim = heap_trimmer()
    if trim is not None:  # glibc: hand freed heap pages back to the OS (see moc_node/heap_trim)
        tickers.append(Ticker(TRIM_INTERVAL_S, trim, "heap-trim").start())
    local = LocalNode(
        name=config.node.name,
        manager=manager,
        board=board,
        ledgers=ledgers,
        gpu_actors=gpu_refs,
        bulkheads=bulkheads,
        store=store,
        abort=abort,
    )
    node: Node = local
    clustered: ClusteredNode | None = None
    deploy: Deploy = _load_here(local)
    if config.cluster.enabled:
        clustered = _clustered_node(config, local, store, keyring or Keyring(()))
        node, deploy = clustered, clustered.place  # one load cluster-wide, by the primary
    runtime = Runtime(config, node, manager_proxy, store, tickers, runtime_dir, clustered)
    runtime.services = start_services(
        config,
        board,
        manager_proxy,
        ledgers,
        asyncio.get_running_loop(),
        deploy=deploy,
        unload=local.unload,
    )
    if runtime.services is not None:
        local.attach_services(runtime.services)
    return runtime


def _load_here(local: LocalNode) -> Deploy:
    async def load(name: str) -> object:
        return await local.load(LoadRequest(name=name))

    return load


def _clustered_node(
    config: Config, local: LocalNode, store: StateStore, keyring: Keyring
) -> ClusteredNode:
    if not keyring.enabled:
        log.warning("cluster without key_file: gossip and peer RPC are NOT authenticated")
    return ClusteredNode(
        local,
        config.cluster,
        name=config.cluster.name or config.node.name,
        keyring=keyring,
        term_store=TermStore(store),
        generation=store.next_generation(),
        request_timeout=config.server.request_timeout_s,
    )


def _poll_all(gpu_proxies: list[DeviceProxy]) -> None:
    for proxy in gpu_proxies:
        proxy.poll()


def _tell(_reply: pykka.Future[None]) -> None:
    """Drop an actor's reply: a tick is a message sent, never waited on (the loop never blocks)."""


def with_demo_model(config: Config) -> Config:
    """Give a config with an empty catalog a generated demo model, so `make run` serves something."""
    if config.models.catalog:
        return config
    from actors.gguf_synth import write_preset

    path = config.node.state_path / "models" / f"{DEMO_MODEL}.gguf"
    if not path.exists():
        log.warning("no model configured: generating a demo GGUF (random weights) at %s", path)
        write_preset(path, "small")
    entry = CatalogEntry(name=DEMO_MODEL, path=str(path), n_ctx=512, preload=True)
    models = dataclasses.replace(config.models, catalog=(entry,))
    return dataclasses.replace(config, models=models)


ServerFactory = Callable[[Node, Config, Keys], list[Front]]


def default_servers(node: Node, config: Config, keys: Keys) -> list[Front]:
    """The HTTP server, the legacy ZMQ server and the legacy gRPC server, with the keys and
    TLS files the preflight read (with TLS, HTTP and gRPC serve it only)."""
    from transports.grpc_server import GrpcServer
    from transports.http import HttpServer
    from transports.tls import grpc_credentials, ssl_context
    from transports.zmq_legacy import ZmqServer

    static = Path(__file__).with_name("static")
    tls = keys.tls
    http = HttpServer(
        node,
        config.server,
        static_dir=static,
        api_keys=keys.api,
        ssl_context=None if tls is None else ssl_context(tls),
    )
    zmq_server = ZmqServer(node, config.server, api_keys=keys.api, zmq_auth=keys.zmq)
    grpc_server = GrpcServer(
        node,
        config.server,
        api_keys=keys.api,
        credentials=None if tls is None else grpc_credentials(tls),
    )
    return [
        Front(http, listener(config, "server.rest_port")),
        Front(zmq_server, listener(config, "server.zmq_port")),
        Front(grpc_server, listener(config, "server.grpc_port")),
    ]


async def serve(
    config: Config,
    keys: Keys,
    *,
    config_path: str | None = None,
    servers: ServerFactory = default_servers,
    started: Callable[[Runtime], Awaitable[None] | None] | None = None,
) -> int:
    """Run a node until SIGTERM or SIGINT; SIGHUP reloads the catalog. Return the exit code.

    `keys` are what `preflight` read. A listener that cannot bind raises ConfigError after
    everything already started (fronts, actors, workers) has been stopped.
    """
    notifier = Notifier()
    runtime = build_runtime(config, keyring=keys.cluster)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    fronts: list[Front] = []
    watchdog_task: asyncio.Task[None] | None = None
    try:  # from here on, whatever fails closes the runtime: its actors would keep us alive
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: _reload(runtime, config_path, notifier))
        fronts = servers(runtime.node, config, keys)
        if notifier.watchdog_interval:
            # Half the interval, as sd_watchdog_enabled(3) advises: one late ping is not a restart.
            interval = notifier.watchdog_interval / 2
            watchdog_task = asyncio.create_task(
                watchdog(notifier, runtime.node.actors_alive, interval)
            )
        for front in fronts:  # up first, so /ready answers 503 while models are restored
            await listen(front.listener, front.server.start)
        if config.cluster.enabled:
            notifier.status("joining the cluster")
        http_port = _bound_port(fronts, "server.rest_port")
        await runtime.join_cluster(http_port, _bound_port(fronts, "server.zmq_port"))
        notifier.status("restoring models")
        await runtime.node.start()
        loaded = sum(m.state == "loaded" for m in runtime.node.models())
        notifier.ready(f"ready: {loaded} model(s) loaded")
        log.info("node %s ready", config.node.name)
        if started is not None:
            maybe = started(runtime)
            if maybe is not None:
                await maybe
        await stop.wait()
        notifier.stopping()
        log.info("stopping: draining requests (up to %.0f s)", config.node.drain_timeout)
        drained = asyncio.create_task(runtime.node.drain(config.node.drain_timeout))
        await runtime.leave_cluster()
        await drained
    finally:
        for front in reversed(fronts):
            await front.server.stop()
        if watchdog_task is not None:
            watchdog_task.cancel()
        await runtime.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        notifier.close()
    log.info("stopped")
    return 0


def _bound_port(fronts: list[Front], key: str) -> int:
    for front in fronts:
        if front.listener.key == key:
            return front.server.port
    return 0


def _reload(runtime: Runtime, config_path: str | None, notifier: Notifier) -> None:
    notifier.reloading()
    try:
        config = load_config(config_path)
        check(config)  # what could not start is not adopted either
        config = with_demo_model(config)
    except Exception as exc:  # a bad edit must not take the running node down
        log.error("reload refused, keeping the running config: %s", exc)
        notifier.ready("reload refused: running config kept")
        return
    runtime.reload(config)
    log.info("configuration reloaded (catalog: %d models)", len(config.models.catalog))
    notifier.ready(f"reloaded: {len(config.models.catalog)} model(s) in the catalog")


def run(config_path: str | None, *, witness: bool = False) -> int:
    """Load and check the config, then serve until stopped (the `moc-node run` command).

    Everything that can be known wrong before a port opens is refused by `preflight`, with one
    ConfigError line; the key files are read there, once.
    """
    config = load_config(config_path)
    if witness and not config.cluster.enabled:
        raise ConfigError("cluster.enabled: a witness needs [cluster] enabled = true")
    keys = preflight(config)
    try:
        if witness:
            return asyncio.run(serve_witness(config, keys.cluster))
        return asyncio.run(serve(with_demo_model(config), keys, config_path=config_path))
    finally:
        # A start that failed half-way must not leave actor threads holding the process alive.
        pykka.ActorRegistry.stop_all()
