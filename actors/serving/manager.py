"""ModelManager: decides which models are loaded where, and starts and stops their actors.

Every decision lives outside this actor: placement, eviction and expiry are pure functions in
`placement`, what a load request becomes is `entry`, catalog reloads and registered outputs are
`catalog`. This actor keeps one `Slot` per model, calls those functions and sends messages. It never waits on another actor: loads and unloads finish later, as
`model_loaded` / `model_stopped` messages from the ModelActors, and whoever asked is answered
through its `Reply` then. After each change it publishes the slot on the `ModelBoard`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from actors import names
from actors.bridge import LoopReplyActor, Reply
from actors.errors import (
    InsufficientMemory,
    MocError,
    ModelAlreadyLoaded,
    ModelNotLoaded,
    ShuttingDown,
    StateNotWritable,
)
from actors.serving import metrics
from actors.serving.board import ModelBoard
from actors.serving.catalog import add_registered, adopt_catalog
from actors.serving.config import CatalogEntry, CircuitBreakerConfig, ModelsConfig
from actors.serving.entry import entry_for, need_mb, worker_spec
from actors.serving.lane import ModelLane
from actors.serving.ledger import Ledger
from actors.serving.memory_watch import MemoryWatch
from actors.serving.model import ModelActor, worker_process
from actors.serving.placement import DeviceRoom, Resident, expired, plan
from actors.serving.probes import DeviceProbe
from actors.serving.resilience import BulkheadRegistry, CircuitBreaker
from actors.serving.slot import Acquired, Slot, Unloaded, model_info, resident
from actors.serving.store import LoadedRecord, RegisteredRecord, StateStore
from actors.serving.threads import thread_shares
from actors.types import Backend, LoadRequest
from actors.worker.backends.threads import physical_cores
from actors.worker.handle import WorkerFactory
from actors.worker.protocol import Loaded

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ManagerDeps:
    """What the manager is built from; production wiring lives in moc_node.app."""

    models: ModelsConfig
    ledgers: Mapping[str, Ledger]
    device_index: Mapping[str, int | None]
    model_dirs: Sequence[Path]
    store: StateStore
    bulkheads: BulkheadRegistry
    breaker: CircuitBreakerConfig
    runtime_dir: Path
    board: ModelBoard
    abort: threading.Event
    probes: Mapping[str, DeviceProbe] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic  # idle times, load times, breakers
    wall_clock: Callable[[], float] = time.time  # only for clients: when a model was last used
    worker_factory: WorkerFactory = worker_process
    memory_watch: MemoryWatch = MemoryWatch()
    cpu_threads: int = 0  # [resources] cpu_threads: 0 = the physical cores
    worker_nice: int = 5  # [resources] worker_nice
    huge_pages: bool = True  # [resources] huge_pages


class ModelManager(LoopReplyActor):
    """Owns the set of models: catalog, loading, loaded, unloading."""

    def __init__(self, deps: ManagerDeps) -> None:
        super().__init__()
        self._deps = deps
        self._models_config = deps.models
        self._slots: dict[str, Slot] = {}
        self._closing = False
        self.reconfigure(deps.models)
        for record in deps.store.registered():
            backend: Backend = "torch" if record.backend == "torch" else "gguf"
            entry = CatalogEntry(record.name, record.path, backend, record.n_ctx, lora=record.lora)
            add_registered(self._slots, entry)
            self._publish(entry.name)

    # -- configuration --------------------------------------------------------------------

    def reconfigure(self, models: ModelsConfig) -> None:
        """Adopt a new catalog and keep_alive (SIGHUP); loaded models stay loaded."""
        self._models_config = models
        for name in adopt_catalog(self._slots, models.catalog):
            self._drop(name)
        for entry in models.catalog:
            self._publish(entry.name)

    def ping(self) -> bool:
        """Answer True: the watchdog's proof that this actor still takes messages."""
        return True

    def register(self, entry: CatalogEntry, reply: Reply[None]) -> None:
        """Add a model a learning job produced to the catalog, durably; answer `reply`.

        An existing model of that name is replaced: the learning actor refuses a job whose output
        would shadow a model unless the client asked for `replace`. A replaced model that is
        loaded keeps serving its old weights until it is next loaded.
        """
        try:
            names.check_name(entry.name, "output_name")
            self._deps.store.record_registered(
                RegisteredRecord(entry.name, entry.path, entry.lora, entry.backend, entry.n_ctx)
            )
            add_registered(self._slots, entry)
        except Exception as exc:
            reply(None, exc)
        else:
            self._publish(entry.name)
            reply(None, None)

    def preload_names(self) -> list[str]:
        """Return catalog names to load at start."""
        cfg = self._models_config
        return [e.name for e in cfg.catalog if e.preload or e.name in cfg.preload]

    # -- requests -------------------------------------------------------------------------

    def acquire(self, request: LoadRequest, reply: Acquired, explicit: bool = False) -> None:
        """Answer `reply` with the model's lane once it is loaded, loading it if needed."""
        try:
            self._acquire(request, reply, explicit)
        except Exception as exc:
            reply(None, exc)

    def _acquire(self, request: LoadRequest, reply: Acquired, explicit: bool) -> None:
        if self._closing:
            raise ShuttingDown("the node is shutting down")
        slot = self._slots.get(request.name)
        if slot is None:
            # Every new name passes here (clients, peers, restore): one that SQLite, a metric
            # label or a reply cannot carry never gets a slot. Catalog names are the operator's.
            names.check_name(request.name, "model_name")
        if slot is not None and slot.state in ("loaded", "loading") and explicit:
            raise ModelAlreadyLoaded(f"model {request.name!r} is already {slot.state}")
        if slot is not None and slot.state == "loaded":
            reply(slot.lane, None)
            return
        if slot is not None and slot.state in ("loading", "unloading"):
            slot.load_waiters.append(reply)
            return
        entry = entry_for(request, slot.entry if slot else None, self._deps.model_dirs)
        if slot is None:
            slot = self._slots[entry.name] = Slot(entry=entry, in_catalog=False)
        slot.entry = entry
        slot.error = None
        try:
            self._place_and_load(slot)
        except Exception:
            if not slot.in_catalog and slot.state == "available":
                self._drop(entry.name)  # refused before it started: nothing of it stays
            raise
        slot.load_waiters.append(reply)

    def _place_and_load(self, slot: Slot) -> None:
        entry = slot.entry
        # Models go to NVML GPUs when there are any; on the CPU (or a simulated device) all
        # stays on the host.
        on_gpu = any(ledger.kind == "nvml" for ledger in self._deps.ledgers.values())
        need = need_mb(entry, on_gpu=on_gpu, node_parallel=self._models_config.parallel)
        residents = self._residents()
        rooms = [
            DeviceRoom(name, ledger.headroom_mb()) for name, ledger in self._deps.ledgers.items()
        ]
        decision = plan(need, rooms, residents, self._models_config.max_loaded)
        if decision is None:
            free = ", ".join(f"{r.name} {r.headroom_mb:.0f} MiB" for r in rooms)
            raise InsufficientMemory(
                f"model {entry.name!r} needs about {need:.0f} MiB; no device has room even "
                f"after evicting idle models (free: {free})"
            )
        slot.state = "loading"
        slot.device = decision.device
        slot.estimate_mb = need
        self._deps.ledgers[decision.device].claim(entry.name, need)
        metrics.model_memory_estimate_mb.labels(entry.name).set(need)
        for victim in decision.evict:
            log.info("evicting idle model %s to make room for %s", victim, entry.name)
            metrics.model_evictions_total.labels("memory").inc()
            slot.blocked_by.add(victim)
            self._begin_unload(self._slots[victim], persist=True)
        if not slot.blocked_by:
            self._start_actor(slot)
        self._publish(entry.name)

    def _reshare_cpu(self) -> dict[str, int]:
        """Share the CPU's threads among the models held there (loading or loaded), tell each
        running one whose share changed, and return the shares."""
        held = {
            name: slot
            for name, slot in self._slots.items()
            if slot.device is not None
            and self._deps.ledgers[slot.device].kind != "nvml"
            and slot.state in ("loading", "loaded")
        }
        if not held:
            return {}
        wanted = {name: slot.entry.threads for name, slot in held.items()}
        shares = thread_shares(self._deps.cpu_threads or physical_cores(), wanted)
        for name, slot in held.items():
            if slot.threads != shares[name] and slot.actor is not None:
                log.info("%s now decodes with %d thread(s)", name, shares[name])
                slot.actor.proxy().set_threads(shares[name])  # told, not awaited
            slot.threads = shares[name]
        return shares

    def _residents(self) -> list[Resident]:
        now = self._deps.clock()
        return [
            resident(
                slot,
                claimed_mb=self._deps.ledgers[slot.device].claims().get(name, 0.0),
                busy=self._deps.bulkheads.occupancy(name) > 0,
                now=now,
            )
            for name, slot in self._slots.items()
            if slot.device is not None
        ]

    def _start_actor(self, slot: Slot) -> None:
        device = slot.device
        assert device is not None
        ledger = self._deps.ledgers[device]
        entry = slot.entry
        spec = worker_spec(
            entry,
            device_kind=ledger.kind,
            device_index=self._deps.device_index.get(device),
            cpu_repack=self._models_config.cpu_repack_for(entry),
            node_parallel=self._models_config.parallel,
            n_threads=self._reshare_cpu().get(entry.name, 0),
            nice=self._deps.worker_nice,
            huge_pages=self._deps.huge_pages,
        )
        slot.slots = spec.load.parallel
        slot.breaker = CircuitBreaker(self._deps.breaker, entry.name)
        events = self.actor_ref.proxy()
        slot.lane = ModelLane(
            entry.name,
            events=events,
            breaker=slot.breaker,
            abort=self._deps.abort,
            clock=self._deps.clock,
            slots=spec.load.parallel,
        )
        slot.actor = ModelActor.start(
            spec,
            runtime_dir=self._deps.runtime_dir,
            events=events,
            lane=slot.lane,
            breaker=slot.breaker,
            abort=self._deps.abort,
            gpu_probe=self._deps.probes.get(device) if ledger.kind == "nvml" else None,
            load_timeout=self._models_config.load_timeout,
            worker_factory=self._deps.worker_factory,
            memory_watch=self._deps.memory_watch,
            clock=self._deps.clock,
        )
        slot.actor.proxy().load()

    def unload(self, name: str, reply: Unloaded) -> None:
        """Unload a model once its queued requests are done; answer `reply` when it is gone."""
        slot = self._slots.get(name)
        if slot is None or slot.state not in ("loaded", "loading", "unloading"):
            reply(None, ModelNotLoaded(f"model {name!r} is not loaded"))
            return
        slot.unload_waiters.append(reply)
        if slot.state != "unloading":
            self._begin_unload(slot, persist=True)

    def _begin_unload(self, slot: Slot, persist: bool) -> None:
        slot.persist_unload = persist
        was_loading = slot.state == "loading"
        slot.state = "unloading"
        if was_loading:
            # A load cut short: whoever waited for it is told, rather than left hanging.
            self._fail_waiters(slot, ModelNotLoaded(f"model {slot.entry.name!r} was unloaded"))
        if slot.actor is not None:
            slot.actor.stop(block=False)  # it waits for the requests in flight on its lane
        else:
            self.model_stopped(slot.entry.name)
        self._publish(slot.entry.name)

    def expire_idle(self) -> None:
        """Unload models idle past keep_alive (never pinned ones, never ones with requests)."""
        keep_alive = self._models_config.keep_alive_seconds
        for name in expired(self._residents(), keep_alive):
            slot = self._slots[name]
            log.info(
                "unloading %s: idle for %.0f s (keep_alive)",
                name,
                self._deps.clock() - slot.last_used,
            )
            metrics.model_evictions_total.labels("keep_alive").inc()
            self._begin_unload(slot, persist=True)

    def close(self) -> list[str]:
        """Refuse new loads and unload everything, remembering the set for the next start."""
        self._closing = True
        stopping = []
        for slot in self._slots.values():
            if slot.state in ("loaded", "loading"):
                self._begin_unload(slot, persist=False)
            if slot.state == "unloading":
                stopping.append(slot.entry.name)
        return stopping

    # -- events from ModelActors ----------------------------------------------------------

    def model_loaded(self, name: str, info: Loaded) -> None:
        """Adopt a model its worker loaded; whoever waits for it gets its lane or the error."""
        slot = self._slots.get(name)
        if slot is None or slot.state not in ("loading", "loaded") or slot.device is None:
            return  # unloaded meanwhile; its stop is on the way
        try:
            self._adopt(slot, info)
        except Exception as exc:
            # Nobody reads this message's future: an error left here would be lost and the
            # client would wait out its whole load timeout. Fail the load instead, and undo it.
            if isinstance(exc, MocError):
                log.error("model %s loaded but cannot be served: %s", name, exc)
            else:
                log.error("model %s loaded but cannot be served", name, exc_info=exc)
            slot.state = "loading"  # as if the load failed: "failed", stopped, waiters told
            self.model_load_failed(name, exc)

    def _adopt(self, slot: Slot, info: Loaded) -> None:
        name = slot.entry.name
        assert slot.device is not None
        first = slot.state == "loading"
        if first:
            # Recorded before it is served: a model the store cannot remember is not served.
            self._deps.store.record_loaded(
                LoadedRecord(
                    name,
                    slot.entry.path,
                    slot.entry.backend,
                    slot.entry.n_ctx,
                    slot.entry.gpu_layers,
                    slot.entry.pin,
                )
            )
        slot.state = "loaded"
        slot.version = info.version
        slot.chat_template = info.chat_template
        slot.pid = info.pid
        slot.last_used = self._deps.clock()
        slot.last_used_wall = self._deps.wall_clock()
        self._measured(slot, info.measured_mb)
        device_label = self._device_label(slot.device)
        if first:
            slot.load_seconds = info.load_seconds
            metrics.model_load_duration_seconds.labels(name).observe(info.load_seconds)
            log.info(
                "loaded %s on %s in %.2f s: estimated %.0f MiB, measured %.0f MiB",
                name,
                device_label,
                info.load_seconds,
                slot.estimate_mb or 0,
                info.measured_mb,
            )
        self._refresh_loaded_gauge()
        self._publish(name)
        waiters, slot.load_waiters = slot.load_waiters, []
        for reply in waiters:
            reply(slot.lane, None)

    def model_load_failed(self, name: str, error: Exception) -> None:
        """Fail a load: whoever waits is told `error`, and the model's actor is stopped."""
        slot = self._slots.get(name)
        if slot is None:
            return
        slot.error = str(error)
        self._fail_waiters(slot, error)
        if slot.state == "loading":
            slot.state = "failed"
            slot.persist_unload = True
            if slot.actor is not None:
                slot.actor.stop(block=False)
            else:
                self.model_stopped(name)
        self._publish(name)

    def model_stopped(self, name: str) -> None:
        """Forget a stopped model's claim and actor; answer unloads, start what waited on it."""
        slot = self._slots.get(name)
        if slot is None:
            return
        if slot.device is not None:
            self._deps.ledgers[slot.device].release(name)
            if slot.measured_mb is not None:
                metrics.model_memory_usage_mb.remove(name, self._device_label(slot.device))
        if slot.persist_unload:
            try:
                self._deps.store.record_unloaded(name)
            except StateNotWritable as exc:  # the model is stopped whatever the store says
                log.warning("%s", exc)
        slot.come_to_rest()
        slot.threads = 0
        self._reshare_cpu()  # the models left on the CPU take its threads back
        self._refresh_loaded_gauge()
        unloaded, slot.unload_waiters = slot.unload_waiters, []
        info = model_info(slot, self._device_label)
        self._unblock(name)
        waiting, slot.load_waiters = slot.load_waiters, []
        if not slot.in_catalog and not waiting:
            self._drop(name)
        else:
            self._publish(name)
        for answer in unloaded:  # after the board shows it gone: the caller may look at once
            answer(info, None)
        for reply in waiting:  # requests that came while it was unloading: load it again
            self.acquire(LoadRequest(name=name, path=slot.entry.path), reply)

    def model_memory(self, name: str, mb: float) -> None:
        """Adopt a model's grown working size as its claim."""
        slot = self._slots.get(name)
        if slot is None or slot.state != "loaded" or slot.device is None:
            return
        self._measured(slot, mb)
        self._publish(name)

    def _measured(self, slot: Slot, mb: float) -> None:
        """Adopt a measurement of a resident model as its size and (at least) its claim."""
        assert slot.device is not None
        slot.measured_mb = mb
        # At load time llama.cpp has reserved its compute buffers but not touched them, so the
        # measurement is below the working size: claim the larger of it and the estimate.
        self._deps.ledgers[slot.device].claim(slot.entry.name, max(mb, slot.estimate_mb or 0.0))
        label = self._device_label(slot.device)
        metrics.model_memory_usage_mb.labels(slot.entry.name, label).set(mb)

    def model_used(self, name: str) -> None:
        """Note that a model served a request now (its idle time starts again)."""
        slot = self._slots.get(name)
        if slot is not None:
            slot.last_used = self._deps.clock()
            slot.last_used_wall = self._deps.wall_clock()
            if self._models_config.keep_alive_seconds == 0:
                self.expire_idle()

    # -- helpers --------------------------------------------------------------------------

    def _drop(self, name: str) -> None:
        """Forget a model that is neither loaded nor in the catalog, and its metric series.

        Its lane and breaker go with its slot, so nothing writes to its series any more; its
        bulkhead goes too if idle (a busy one looks its series up again on its next use).
        """
        del self._slots[name]
        self._deps.board.remove(name)
        self._deps.bulkheads.forget(name)
        metrics.forget_model(name)

    def _unblock(self, evicted: str) -> None:
        for slot in self._slots.values():
            if evicted in slot.blocked_by:
                slot.blocked_by.discard(evicted)
                if not slot.blocked_by and slot.state == "loading":
                    self._start_actor(slot)

    def _fail_waiters(self, slot: Slot, error: Exception) -> None:
        waiters, slot.load_waiters = slot.load_waiters, []
        for reply in waiters:
            reply(None, error)

    def _refresh_loaded_gauge(self) -> None:
        loaded = sum(1 for s in self._slots.values() if s.state == "loaded")
        metrics.models_loaded_total.set(loaded)

    def _device_label(self, device: str) -> str:
        ledger = self._deps.ledgers[device]
        return f"{device} (simulated)" if ledger.kind == "simulated" else device

    def _publish(self, name: str) -> None:
        slot = self._slots.get(name)
        if slot is not None:
            self._deps.board.put(model_info(slot, self._device_label), slot.breaker, slot.lane)
