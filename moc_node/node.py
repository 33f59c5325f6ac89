"""The Node: one async API over the actors (load, unload, list, infer, status).

Transports call it on the event loop. Nothing here blocks the loop: actor replies come back
through callbacks that hop onto the loop with `call_soon_threadsafe`, and streamed tokens the same
way, through an asyncio queue per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import pykka

import moc_node
from actors.errors import (
    Cancelled,
    FeatureUnavailable,
    MocError,
    ModelNotFound,
    ModelNotLoaded,
    ShuttingDown,
)
from actors.serving import metrics
from actors.serving.estimate import estimate_gguf_memory
from actors.serving.lane import LaneClosed, ModelLane
from actors.serving.ledger import Ledger
from actors.serving.manager import ModelBoard
from actors.serving.resilience import BulkheadRegistry
from actors.serving.store import StateStore
from actors.types import (
    ComponentHealth,
    DeviceInfo,
    HealthReport,
    HealthStatus,
    InferRequest,
    InferResult,
    LoadRequest,
    ModelInfo,
    TokenChunk,
)

if TYPE_CHECKING:
    from moc_node.cluster_link import ClusterLink

log = logging.getLogger(__name__)

# The `model` label of requests for a name that serves no model: one series for all of them.
UNKNOWN_MODEL = "(unknown)"

StreamItem = TokenChunk | InferResult


def _reply_on_loop(
    loop: asyncio.AbstractEventLoop,
) -> tuple[asyncio.Future[Any], Callable[[Any, Exception | None], None]]:
    """Return a loop future and a thread-safe callback `(value, error)` that settles it."""
    future: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any, error: Exception | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def reply(value: Any, error: Exception | None) -> None:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, value, error)

    return future, reply


class Node:
    """The single entry point the transports call (implements transports.api.NodeAPI)."""

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
        self.name = name
        self._manager = manager.proxy()
        self._manager_ref = manager
        self._board = board
        self._ledgers = ledgers
        self._gpu_actors = gpu_actors
        self._bulkheads = bulkheads
        self._store = store
        self._abort = abort
        self._request_timeout = request_timeout
        self._learning: Any | None = None
        self._goals: Any | None = None
        self._ready = False
        self._draining = False
        self._cluster: ClusterLink | None = None
        self.closed = False
        self._started = time.time()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Restore the models loaded before the last stop, preload configured ones, be ready.

        In a cluster (attached before this is called), a remembered model that a live peer
        now holds is not loaded again but forgotten: the cluster placed it there meanwhile.
        """
        wanted: dict[str, LoadRequest] = {}
        records = self._store.loaded()
        if self._cluster is not None and records:
            plan = await self._cluster.plan_restore(records)
            for name, holder in plan.skip.items():
                log.info("not restoring model %s: %s holds it now", name, holder)
                try:
                    self._store.record_unloaded(name)
                except MocError as exc:  # it is asked about again at the next start
                    log.warning("%s", exc)
            records = [r for r in records if r.name not in plan.skip]
        for record in records:
            wanted[record.name] = LoadRequest(
                name=record.name,
                path=record.path,
                backend=record.backend,  # type: ignore[arg-type]
                n_ctx=record.n_ctx,
                gpu_layers=record.gpu_layers,
                pin=record.pinned,
            )
        loop = asyncio.get_running_loop()
        preload: list[str] = await loop.run_in_executor(None, self._manager.preload_names().get)
        for name in preload:
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
        pings = [self._manager.ping()] + [ref.proxy().ping() for ref in self._gpu_actors]
        loop = asyncio.get_running_loop()
        answers = await loop.run_in_executor(None, lambda: [p.get(timeout=timeout) for p in pings])
        return all(answers)

    def is_ready(self) -> bool:
        return self._ready and not self._draining

    @property
    def draining(self) -> bool:
        return self._draining

    async def drain(self, timeout: float) -> None:
        """Stop taking requests and wait (up to `timeout`) for the in-flight ones to finish."""
        self._draining = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._in_flight() > 0:
            await asyncio.sleep(0.05)  # polling a condition with a deadline
        if self._in_flight():
            log.warning(
                "%d request(s) still running after %.0f s: aborting them",
                self._in_flight(),
                timeout,
            )

    async def close(self, timeout: float = 30.0) -> None:
        """Unload every model (remembering them for the next start) and stop the actors."""
        if self.closed:
            return
        self.closed = True
        self._draining = True
        self._abort.set()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._manager.close().get)
        await loop.run_in_executor(
            None,
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

    def _in_flight(self) -> int:
        return sum(self._bulkheads.in_flight(m.name) for m in self._board.snapshot(0.0))

    # -- NodeAPI ----------------------------------------------------------------------------

    async def load(self, req: LoadRequest) -> ModelInfo:
        self._check_open()
        await self._acquire(req, explicit=True)
        return self._model_info(req.name)

    async def unload(self, name: str) -> ModelInfo:
        future, reply = _reply_on_loop(asyncio.get_running_loop())
        self._manager.unload(name, reply)
        info: ModelInfo = await future
        return info

    def models(self) -> list[ModelInfo]:
        return [self._with_queue(m) for m in self._board.snapshot(time.monotonic())]

    def devices(self) -> list[DeviceInfo]:
        return [ledger.info() for ledger in self._ledgers.values()]

    async def infer(self, req: InferRequest) -> InferResult:
        link = self._cluster
        if link is not None and self._goes_remote(link, req.model):
            return await link.infer_remote(req)  # a coroutine: no generator layers to forward
        return await self.infer_local(req)

    def infer_stream(self, req: InferRequest) -> AsyncGenerator[StreamItem, None]:
        return self._run(req, stream=True)

    def health(self) -> HealthReport:
        components: dict[str, ComponentHealth] = {}
        devices = self.devices()
        components["devices"] = ComponentHealth(
            "healthy" if devices else "unhealthy",
            ", ".join(f"{d.label}: {d.free_mb:.0f}/{d.total_mb:.0f} MiB free" for d in devices),
        )
        # The board's snapshot: health needs no queue figures (models() adds them per model).
        models = self._board.snapshot(time.monotonic())
        broken = [m.name for m in models if m.state == "failed" or m.breaker != "closed"]
        components["models"] = ComponentHealth(
            "degraded" if broken else "healthy",
            f"{sum(m.state == 'loaded' for m in models)} loaded"
            + (f"; failing: {', '.join(broken)}" if broken else ""),
        )
        components["state_store"] = ComponentHealth("healthy", str(self._store.path))
        components["node"] = ComponentHealth(
            "degraded" if self._draining else "healthy",
            "draining" if self._draining else ("ready" if self._ready else "starting"),
        )
        worst: HealthStatus = "healthy"
        for component in components.values():
            if component.status == "unhealthy":
                worst = "unhealthy"
            elif component.status == "degraded" and worst == "healthy":
                worst = "degraded"
        return HealthReport(worst, components)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": moc_node.__version__,
            "uptime_s": round(time.time() - self._started, 1),
            "ready": self.is_ready(),
            "draining": self._draining,
            "devices": [_device_json(d) for d in self.devices()],
            "models": [_model_json(m) for m in self.models()],
        }

    # -- learning jobs and goals (actors of their own; asked off the loop) --------------------

    async def list_jobs(self, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        learning = self._learning_or_fail()
        jobs: list[dict[str, Any]] = await _ask(learning.list_jobs(limit, offset))
        return jobs

    async def create_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        self._check_open()
        learning = self._learning_or_fail()
        job_id = await _ask(learning.submit(spec))
        job: dict[str, Any] = await _ask(learning.get(job_id))
        return job

    async def get_job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = await _ask(self._learning_or_fail().get(job_id))
        return job

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = await _ask(self._learning_or_fail().cancel(job_id))
        return job

    async def list_goals(self, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        goals: list[dict[str, Any]] = await _ask(self._goals_or_fail().list_goals(limit, offset))
        return goals

    async def create_goal(self, spec: dict[str, Any]) -> dict[str, Any]:
        self._check_open()
        goal: dict[str, Any] = await _ask(self._goals_or_fail().create(spec))
        return goal

    async def get_goal(self, goal_id: str) -> dict[str, Any]:
        goal: dict[str, Any] = await _ask(self._goals_or_fail().get(goal_id))
        return goal

    async def cancel_goal(self, goal_id: str) -> dict[str, Any]:
        goal: dict[str, Any] = await _ask(self._goals_or_fail().cancel(goal_id))
        return goal

    def _learning_or_fail(self) -> Any:
        if self._learning is None:
            raise FeatureUnavailable(
                "learning is not enabled on this node: install the torch extra "
                "(pip install 'moc-node[torch]') and restart"
            )
        return self._learning

    def _goals_or_fail(self) -> Any:
        if self._goals is None:
            raise FeatureUnavailable("goals are not enabled on this node (they need learning)")
        return self._goals

    def cluster_view(self) -> dict[str, Any]:
        """Describe the cluster; a node without one reports itself as the only member."""
        if self._cluster is not None:
            return self._cluster.view()
        models = self.models()
        me = {
            "name": self.name,
            "state": "leaving" if self._draining else "alive",
            "incarnation": 0,
            "devices": [_device_json(d) for d in self.devices()],
            "models": [
                {"name": m.name, "state": m.state, "in_flight": m.in_flight, "queued": m.queued}
                for m in models
                if m.state in ("loaded", "loading")
            ],
        }
        holders = {m.name: [self.name] for m in models if m.state == "loaded"}
        return {
            "enabled": False,
            "self": self.name,
            "primary": None,
            "term": 0,
            "members": [me],
            "models": holders,
        }

    # -- internals --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._draining:
            raise ShuttingDown("the node is shutting down and takes no new requests")

    async def _acquire(self, req: LoadRequest, explicit: bool = False) -> ModelLane:
        future, reply = _reply_on_loop(asyncio.get_running_loop())
        self._manager.acquire(req, reply, explicit)
        lane: ModelLane = await future
        return lane

    def attach_services(self, learning: pykka.ActorRef[Any], goals: pykka.ActorRef[Any]) -> None:
        """Serve learning jobs and goals through these actors."""
        self._learning = learning.proxy()
        self._goals = goals.proxy()

    @property
    def cluster(self) -> ClusterLink | None:
        """The cluster this node belongs to, if any."""
        return self._cluster

    def attach_cluster(self, link: ClusterLink) -> None:
        """Route requests for models this node does not hold through `link`."""
        self._cluster = link

    def in_catalog(self, model: str) -> bool:
        """Return whether this node knows `model` (catalog or loaded)."""
        return self._board.get(model) is not None

    def model_info(self, name: str) -> ModelInfo | None:
        info = self._board.get(name)
        return None if info is None else self._with_queue(info)

    def estimate_mb(self, model: str) -> float | None:
        """Estimate the memory `model` needs, if this node has its file."""
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

    def _holds(self, model: str) -> bool:
        info = self._board.get(model)
        return info is not None and info.state in ("loaded", "loading")

    def _goes_remote(self, link: ClusterLink, model: str) -> bool:
        """Return whether a client's request for `model` is served through the cluster."""
        # Draining, a node hands requests to peers that hold the model; otherwise a model it
        # does not hold is served wherever the cluster has (or places) it.
        if self._draining:
            return link.holds_elsewhere(model)
        return not self._holds(model)

    async def _run(self, req: InferRequest, *, stream: bool) -> AsyncGenerator[StreamItem, None]:
        """Serve a client's request: here if this node holds the model, else through a peer."""
        link = self._cluster
        if link is not None and self._goes_remote(link, req.model):
            async with contextlib.aclosing(link.serve_remote(req, stream=stream)) as items:
                async for item in items:
                    yield item
            return
        async with contextlib.aclosing(self.serve_local(req, stream=stream)) as items:
            async for item in items:
                yield item

    async def serve_local(
        self, req: InferRequest, *, stream: bool
    ) -> AsyncGenerator[StreamItem, None]:
        """Serve a request with this node's own models (never forwarded)."""
        if not stream:
            yield await self.infer_local(req)
            return
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

    async def infer_local(self, req: InferRequest) -> InferResult:
        """Run a whole inference with this node's own models (never forwarded)."""
        self._check_open()
        outcome = "error"
        try:
            async with self._bulkheads.get(req.model).slot():
                lane = await self._lane(req.model)
                try:
                    result = await lane.infer(req, self._deadline(req))
                except LaneClosed:  # unloaded just now: the manager loads it anew
                    lane = await self._acquire(LoadRequest(name=req.model))
                    result = await lane.infer(req, self._deadline(req))
                outcome = "success"
                return result
        except MocError as exc:
            outcome = exc.code
            raise
        except asyncio.CancelledError:
            outcome = Cancelled.code  # the caller left; the lane cancelled it in the worker
            raise
        finally:
            self._count(req.model, outcome)

    def _count(self, model: str, outcome: str) -> None:
        """Count one finished request; a name that serves no model leaves nothing behind."""
        if outcome == ModelNotFound.code:
            # Any string a client sends would otherwise become a bulkhead and label children.
            self._bulkheads.forget(model)
            model = UNKNOWN_MODEL
        metrics.inference_requests_total.labels(model, outcome).inc()

    def _deadline(self, req: InferRequest) -> float:
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


async def _ask(future: Any) -> Any:
    """Wait for a pykka future off the event loop (its get() blocks)."""
    return await asyncio.get_running_loop().run_in_executor(None, future.get)


def _device_json(d: DeviceInfo) -> dict[str, Any]:
    return {
        "name": d.label,
        "kind": d.kind,
        "simulated": d.simulated,
        "total_mb": d.total_mb,
        "used_mb": d.used_mb,
        "claimed_mb": d.claimed_mb,
        "free_mb": d.free_mb,
        "utilization_percent": d.utilization_percent,
        "temperature_c": d.temperature_c,
    }


def _model_json(m: ModelInfo) -> dict[str, Any]:
    return asdict(m)
