"""This host's node: one async API over its actors (load, unload, list, infer, status, jobs).

`LocalNode` serves the models of this host and nothing else; `moc_node.clustered` wraps it to
route through a cluster. Transports call either on the event loop as a `Node`. Nothing here
blocks the loop: actor replies reach it through `actors.bridge` (`ask`, `reply_on_loop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any, Protocol, TypeVar

import pykka

import moc_node
from actors.bridge import ask, reply_on_loop
from actors.errors import (
    Cancelled,
    FeatureUnavailable,
    MocError,
    ModelNotFound,
    ModelNotLoaded,
    ShuttingDown,
)
from actors.serving import metrics
from actors.serving.board import ModelBoard
from actors.serving.estimate import estimate_gguf_memory
from actors.serving.lane import LaneClosed, ModelLane
from actors.serving.ledger import Ledger
from actors.serving.resilience import BulkheadRegistry
from actors.serving.store import LoadedRecord, StateStore
from actors.types import (
    DeviceInfo,
    EmbedRequest,
    EmbedResult,
    HealthReport,
    InferRequest,
    InferResult,
    LoadRequest,
    ModelInfo,
    TokenChunk,
)
from moc_node.describe import device_json, health_report, solo_view
from moc_node.proxies import DeviceProxy, GoalsProxy, LearningProxy, ManagerProxy, typed
from moc_node.services import Services
from transports.api import NodeAPI

log = logging.getLogger(__name__)
T = TypeVar("T")

# The `model` label of requests for a name that serves no model: one series for all of them.
UNKNOWN_MODEL = "(unknown)"

StreamItem = TokenChunk | InferResult


class Node(NodeAPI, Protocol):
    """What the program runs: the transports' NodeAPI and the node's lifecycle."""

    @property
    def name(self) -> str:
        """The node's name (the cluster's member name when clustered)."""
        ...

    @property
    def draining(self) -> bool:
        """True once `drain` began: no new requests are taken."""
        ...

    @property
    def closed(self) -> bool:
        """True once `close` began."""
        ...

    async def start(self) -> None:
        """Restore the models of the last run, preload the configured ones, become ready."""

    async def actors_alive(self, timeout: float = 2.0) -> bool:
        """Return True if every actor answers a ping within `timeout`."""
        ...

    async def drain(self, timeout: float) -> None:
        """Stop taking requests; wait up to `timeout` for those in flight."""

    async def close(self, timeout: float = 30.0) -> None:
        """Unload every model (remembered for the next start) and stop the actors."""


class LocalNode:
    """This host's models behind the NodeAPI (a `Node`); never forwards anything."""

    def __init__(
        self,
        *,
        name: str,
        manager: pykka.ActorRef[Any],
        board: ModelBoard,
        ledgers: Mapping[str, Ledger],
        gpu_actors: Sequence[pykka.ActorRef[Any]],
        bulkheads: BulkheadRegistry,
        store: StateStore,
        abort: threading.Event,
        request_timeout: float = 600.0,
    ) -> None:
        self._name = name
        self._manager = typed(manager, ManagerProxy)
        self._manager_ref = manager
        self._board = board
        self._ledgers = ledgers
        self._gpu_actors = gpu_actors
        self._devices = [typed(ref, DeviceProxy) for ref in gpu_actors]
        self._bulkheads = bulkheads
        self._store = store
        self._abort = abort
        self._request_timeout = request_timeout
        self._learning: LearningProxy | None = None
        self._goals: GoalsProxy | None = None
        self._ready = False
        self._draining = False
        self.closed = False
        self._started = time.time()

    @property
    def name(self) -> str:
        return self._name

    # -- lifecycle --------------------------------------------------------------------------

    def remembered(self) -> list[LoadedRecord]:
        """Return the models that were loaded when this node last stopped."""
        return self._store.loaded()

    def forget(self, model: str) -> None:
        """Stop remembering `model` as loaded here (a peer holds it now)."""
        try:
            self._store.record_unloaded(model)
        except MocError as exc:  # it is asked about again at the next start
            log.warning("%s", exc)

    async def start(self, records: Sequence[LoadedRecord] | None = None) -> None:
        """Load `records` (default: those remembered), preload configured models, be ready."""
        wanted: dict[str, LoadRequest] = {}
        for record in self.remembered() if records is None else records:
            wanted[record.name] = LoadRequest(
                name=record.name,
                path=record.path,
                backend=record.backend,  # type: ignore[arg-type]
                n_ctx=record.n_ctx,
                gpu_layers=record.gpu_layers,
                pin=record.pinned,
            )
        for name in await ask(self._manager.preload_names()):
            wanted.setdefault(name, LoadRequest(name=name))
        results = await asyncio.gather(
            *(self._acquire(req) for req in wanted.values()), return_exceptions=True
        )
        for req, result in zip(wanted.values(), results, strict=True):
            if isinstance(result, BaseException):
                log.error("could not restore model %s: %s", req.name, result)
            else:
                log.info("model %s restored", req.name)
        self._ready = True

    async def actors_alive(self, timeout: float = 2.0) -> bool:
        """Return True if the manager and every device actor answer a ping within `timeout`."""
        pings = [ask(self._manager.ping())] + [ask(device.ping()) for device in self._devices]
        return all(await asyncio.wait_for(asyncio.gather(*pings), timeout))

    def is_ready(self) -> bool:
        return self._ready and not self._draining

    @property
    def draining(self) -> bool:
        return self._draining

    async def drain(self, timeout: float) -> None:
        """Stop taking requests and wait (up to `timeout`) for the in-flight ones to finish."""
        self._draining = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._occupancy() > 0:
            await asyncio.sleep(0.05)  # polling a condition with a deadline
        if self._occupancy():
            log.warning(
                "%d request(s) still running after %.0f s: aborting them",
                self._occupancy(),
                timeout,
            )

    async def close(self, timeout: float = 30.0) -> None:
        """Unload every model (remembering them for the next start) and stop the actors."""
        if self.closed:
            return
        self.closed = True
        self._draining = True
        self._abort.set()
        await ask(self._manager.close())
        await asyncio.get_running_loop().run_in_executor(
            None,  # the board's wait blocks on a condition, not an actor: a thread waits
            lambda: self._board.wait_until(
                lambda models: all(
                    m.state not in ("loaded", "loading", "unloading") for m in models
                ),
                timeout,
            ),
        )
        self._manager_ref.stop()
        for ref in self._gpu_actors:
            ref.stop()
        self._store.close()

    def _occupancy(self) -> int:
        """Requests admitted or waiting in every model's bulkhead."""
        return sum(self._bulkheads.occupancy(m.name) for m in self._board.snapshot(0.0))

    # -- NodeAPI ----------------------------------------------------------------------------

    async def load(self, req: LoadRequest) -> ModelInfo:
        self._check_open()
        await self._acquire(req, explicit=True)
        return self._model_info(req.name)

    async def unload(self, name: str) -> ModelInfo:
        future, reply = reply_on_loop(asyncio.get_running_loop())
        self._manager.unload(name, reply)
        info: ModelInfo = await future
        return info

    def models(self) -> list[ModelInfo]:
        return [self._with_queue(m) for m in self._board.snapshot(time.monotonic())]

    def devices(self) -> list[DeviceInfo]:
        return [ledger.info() for ledger in self._ledgers.values()]

    async def infer(self, req: InferRequest) -> InferResult:
        """Run a whole inference with this node's own models."""
        return await self._through_lane(
            req.model, lambda lane: lane.infer(req, self._deadline(req))
        )

    async def infer_stream(self, req: InferRequest) -> AsyncGenerator[StreamItem, None]:
        """Stream an inference from this node's own models: pieces, then the result."""
        self._check_open()
        outcome = "error"
        try:
            async with self._bulkheads.get(req.model).slot():
                lane = await self._lane(req.model)
                pieces = lane.stream(req, self._deadline(req))
                async with contextlib.aclosing(pieces):
                    async for item in pieces:
                        if isinstance(item, InferResult):
                            outcome = "success"
                            yield item
                        else:
                            yield TokenChunk(item)
        except MocError as exc:
            outcome = exc.code
            raise
        except (GeneratorExit, asyncio.CancelledError):
            if outcome != "success":  # closed after its result: a success, not a cancel
                outcome = Cancelled.code
            raise
        finally:
            self._count(req.model, outcome)

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        """Embed with this node's own models (a cold catalog model is loaded first), through
        the model's bulkhead like any request."""
        return await self._through_lane(
            req.model, lambda lane: lane.embed(req, self._deadline(req))
        )

    async def _through_lane(self, model: str, call: Callable[[ModelLane], Awaitable[T]]) -> T:
        """Make one whole call on `model`'s lane inside its bulkhead, counted by outcome; a
        lane closed just now (the model was unloaded) is asked for anew, once."""
        self._check_open()
        outcome = "error"
        try:
            async with self._bulkheads.get(model).slot():
                lane = await self._lane(model)
                try:
                    result = await call(lane)
                except LaneClosed:  # unloaded just now: the manager loads it anew
                    lane = await self._acquire(LoadRequest(name=model))
                    result = await call(lane)
                outcome = "success"
                return result
        except MocError as exc:
            outcome = exc.code
            raise
        except asyncio.CancelledError:
            outcome = Cancelled.code  # the caller left; the lane cancelled it in the worker
            raise
        finally:
            self._count(model, outcome)

    def health(self) -> HealthReport:
        # The board's snapshot: health needs no queue figures (models() adds them per model).
        return health_report(
            self.devices(),
            self._board.snapshot(time.monotonic()),
            store=str(self._store.path),
            ready=self._ready,
            draining=self._draining,
        )

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": moc_node.__version__,
            "uptime_s": round(time.time() - self._started, 1),
            "ready": self.is_ready(),
            "draining": self._draining,
            "devices": [device_json(d) for d in self.devices()],
            "models": [asdict(m) for m in self.models()],
        }

    def cluster_view(self) -> dict[str, Any]:
        """Describe the cluster: a node without one reports itself as the only member."""
        return solo_view(self.name, self.devices(), self.models(), draining=self._draining)

    # -- learning jobs and goals (actors of their own) ----------------------------------------

    def attach_services(self, services: Services) -> None:
        """Serve learning jobs and goals through these actors."""
        self._learning = services.learning
        self._goals = services.goals

    async def list_jobs(self, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        return await ask(self._learning_or_fail().list_jobs(limit, offset))

    async def create_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        self._check_open()
        learning = self._learning_or_fail()
        job_id = await ask(learning.submit(spec))
        return await ask(learning.get(job_id))

    async def get_job(self, job_id: str) -> dict[str, Any]:
        return await ask(self._learning_or_fail().get(job_id))

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        return await ask(self._learning_or_fail().cancel(job_id))

    async def list_goals(self, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        return await ask(self._goals_or_fail().list_goals(limit, offset))

    async def create_goal(self, spec: dict[str, Any]) -> dict[str, Any]:
        self._check_open()
        return await ask(self._goals_or_fail().create(spec))

    async def get_goal(self, goal_id: str) -> dict[str, Any]:
        return await ask(self._goals_or_fail().get(goal_id))

    async def cancel_goal(self, goal_id: str) -> dict[str, Any]:
        return await ask(self._goals_or_fail().cancel(goal_id))

    def _learning_or_fail(self) -> LearningProxy:
        if self._learning is None:
            raise FeatureUnavailable(
                "learning is not enabled on this node: install the torch extra "
                "(pip install 'moc-node[torch]') and restart"
            )
        return self._learning

    def _goals_or_fail(self) -> GoalsProxy:
        if self._goals is None:
            raise FeatureUnavailable("goals are not enabled on this node (they need learning)")
        return self._goals

    # -- what the cluster asks of this host ---------------------------------------------------

    def in_catalog(self, model: str) -> bool:
        """Return whether this node knows `model` (catalog or loaded)."""
        return self._board.get(model) is not None

    def holds(self, model: str) -> bool:
        """Return whether `model` is loaded or loading here."""
        info = self._board.get(model)
        return info is not None and info.state in ("loaded", "loading")

    def model_info(self, name: str) -> ModelInfo | None:
        info = self._board.get(name)
        return None if info is None else self._with_queue(info)

    def estimate_mb(self, model: str) -> float | None:
        """Estimate the memory `model` needs, if this node has its file (reads it: blocks)."""
        info = self._board.get(model)
        if info is None:
            return None
        if info.estimate_mb is not None:
            return info.estimate_mb
        if info.backend != "gguf":
            return None
        try:
            return float(estimate_gguf_memory(info.path, n_ctx=info.n_ctx or 2048).total_mb)
        except Exception:  # an unreadable file: the primary then places by free memory alone
            return None

    # -- internals --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._draining:
            raise ShuttingDown("the node is shutting down and takes no new requests")

    async def _acquire(self, req: LoadRequest, explicit: bool = False) -> ModelLane:
        future, reply = reply_on_loop(asyncio.get_running_loop())
        self._manager.acquire(req, reply, explicit)
        lane: ModelLane = await future
        return lane

    def _count(self, model: str, outcome: str) -> None:
        """Count one finished request; a name that serves no model leaves nothing behind."""
        if outcome == ModelNotFound.code:
            # Any string a client sends would otherwise become a bulkhead and label children.
            self._bulkheads.forget(model)
            model = UNKNOWN_MODEL
        metrics.inference_requests_total.labels(model, outcome).inc()

    def _deadline(self, req: InferRequest | EmbedRequest) -> float:
        return time.monotonic() + (req.timeout_s or self._request_timeout)

    async def _lane(self, model: str) -> ModelLane:
        """Return the model's lane, loading the model first if it is cold."""
        # Fast path: a loaded model's lane is on the board; only cold ones ask the manager.
        lane = self._board.lane(model)
        if lane is None or lane.closing:
            lane = await self._acquire(LoadRequest(name=model))
        return lane

    def _with_queue(self, info: ModelInfo) -> ModelInfo:
        bulkhead = self._bulkheads.get(info.name)
        if (info.in_flight, info.queued) == (bulkhead.active, bulkhead.waiting):
            return info  # an idle model, nearly always: no copy
        return replace(info, in_flight=bulkhead.active, queued=bulkhead.waiting)

    def _model_info(self, name: str) -> ModelInfo:
        info = self._board.get(name)
        if info is None:
            raise ModelNotLoaded(f"model {name!r} is not loaded")
        return self._with_queue(info)


__all__ = ["UNKNOWN_MODEL", "LocalNode", "Node", "StreamItem"]
