"""Wire the learning and goal actors to the node: memory claims, model lookup, registration.

Only on nodes with torch installed (the `torch` extra); elsewhere both features answer 501.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pykka

from actors.bridge import Reply
from actors.errors import ModelNotFound
from actors.goals.actor import GoalActor
from actors.learning.actor import LearningActor
from actors.serving.board import ModelBoard
from actors.serving.config import CatalogEntry
from actors.serving.ledger import Ledger
from actors.serving.placement import DeviceRoom, choose_device
from moc_node.config import Config
from moc_node.proxies import GoalsProxy, LearningProxy, ManagerProxy, typed

log = logging.getLogger(__name__)


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


class JobMemory:
    """Claims for training jobs in the same ledgers as the models (so neither OOMs the other)."""

    def __init__(self, ledgers: Mapping[str, Ledger]) -> None:
        self._ledgers = ledgers
        self._lock = threading.Lock()
        self._where: dict[str, str] = {}

    def claim(self, job_id: str, mb: float) -> bool:
        """Claim `mb` on the best-fitting device; False when no device has room now."""
        with self._lock:
            rooms = [
                DeviceRoom(name, ledger.headroom_mb()) for name, ledger in self._ledgers.items()
            ]
            device = choose_device(mb, rooms)
            if device is None:
                return False
            self._ledgers[device].claim(f"job:{job_id}", mb)
            self._where[job_id] = device
            return True

    def release(self, job_id: str) -> None:
        with self._lock:
            device = self._where.pop(job_id, None)
        if device is not None:
            self._ledgers[device].release(f"job:{job_id}")


Deploy = Callable[[str], Coroutine[Any, Any, object]]
"""Have a model loaded (in a cluster: wherever the primary places it); called on the loop."""
Unload = Callable[[str], Coroutine[Any, Any, object]]
"""Unload a model from this node; called on the loop."""


@dataclass
class Services:
    """The started learning and goal actors, and their typed proxies."""

    learning_ref: pykka.ActorRef[Any]
    goals_ref: pykka.ActorRef[Any]
    learning: LearningProxy = field(init=False)
    goals: GoalsProxy = field(init=False)

    def __post_init__(self) -> None:
        self.learning = typed(self.learning_ref, LearningProxy)
        self.goals = typed(self.goals_ref, GoalsProxy)

    def stop(self) -> None:
        """Stop goals first (their steps follow jobs), then learning; running work resumes later."""
        self.goals.stop_all().get(timeout=60)
        self.goals_ref.stop()
        self.learning.stop_all().get(timeout=60)
        self.learning_ref.stop()


def learning_output_dir(config: Config) -> Path:
    return Path(config.learning.resolved(config.node.state_path).output_dir)


def start_services(
    config: Config,
    board: ModelBoard,
    manager: ManagerProxy,
    ledgers: Mapping[str, Ledger],
    loop: asyncio.AbstractEventLoop,
    *,
    deploy: Deploy,
    unload: Unload,
) -> Services | None:
    """Start learning and goals when torch is installed; None (features off) otherwise.

    `deploy` and `unload` run on `loop`; the goal steps that call them run in threads of their
    own, which wait for the answer.
    """
    if not torch_available():
        log.info("torch is not installed: learning jobs and goals are disabled")
        return None
    state = config.node.state_path
    learning_config = config.learning.resolved(state)
    memory = JobMemory(ledgers)

    def resolve_model(name: str) -> Path:
        info = board.get(name)
        if info is None:
            raise ModelNotFound(f"model {name!r} is not in the catalog")
        # An adapter model is its adapter file: scoring applies it to the base it names.
        return Path(info.adapter or info.path)

    def register(name: str, path: Path, base: str | None, done: Reply[None]) -> None:
        if base is None:
            entry = CatalogEntry(name=name, path=str(path))
        else:
            base_info = board.get(base)
            if base_info is None:
                raise ModelNotFound(f"base model {base!r} is gone")
            entry = CatalogEntry(
                name=name, path=base_info.path, n_ctx=base_info.n_ctx or 2048, lora=str(path)
            )
        kind = f"LoRA on {base}" if base else "new GGUF"

        def registered(value: None, error: Exception | None) -> None:
            if error is None:
                log.info("registered %s (%s)", name, kind)
            done(value, error)

        manager.register(entry, registered)  # answers `done` later: nobody waits for it

    def load_blocking(name: str) -> object:
        return asyncio.run_coroutine_threadsafe(deploy(name), loop).result()

    def unload_blocking(name: str) -> object:
        return asyncio.run_coroutine_threadsafe(unload(name), loop).result()

    learning = LearningActor.start(
        learning_config,
        claim=memory.claim,
        release=memory.release,
        resolve_model=resolve_model,
        register=register,
    )
    goals = GoalActor.start(
        config.goals.resolved(state),
        learning=learning.proxy(),
        resolve_model=resolve_model,
        load=load_blocking,
        unload=unload_blocking,
        eval_dirs=learning_config.dataset_dirs,
    )
    return Services(learning, goals)
