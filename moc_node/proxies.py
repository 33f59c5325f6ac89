"""Typed proxies of the actors the node talks to, so that mypy checks every call through them.

pykka's proxies are dynamic (`proxy.anything` is Any); each class here names the methods the
node calls with `proxy_method`, which turns `(self, *args) -> T` into `(*args) -> Future[T]`.
`typed(ref, ProxyClass)` is the one cast from a ref's proxy to its typed view.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

import pykka
from pykka.typing import ActorMemberMixin, proxy_method

from actors.goals.actor import GoalActor
from actors.learning.actor import LearningActor
from actors.serving.gpu import GPUActor
from actors.serving.manager import ModelManager


class ManagerProxy(ActorMemberMixin, pykka.ActorProxy[ModelManager]):
    """The model manager: loads, unloads and the catalog."""

    acquire = proxy_method(ModelManager.acquire)
    unload = proxy_method(ModelManager.unload)
    preload_names = proxy_method(ModelManager.preload_names)
    register = proxy_method(ModelManager.register)
    reconfigure = proxy_method(ModelManager.reconfigure)
    expire_idle = proxy_method(ModelManager.expire_idle)
    close = proxy_method(ModelManager.close)
    ping = proxy_method(ModelManager.ping)


class DeviceProxy(ActorMemberMixin, pykka.ActorProxy[GPUActor]):
    """One device's actor: it measures the device into its ledger."""

    poll = proxy_method(GPUActor.poll)
    ping = proxy_method(GPUActor.ping)


class LearningProxy(ActorMemberMixin, pykka.ActorProxy[LearningActor]):
    """The learning actor: training jobs."""

    submit = proxy_method(LearningActor.submit)
    list_jobs = proxy_method(LearningActor.list_jobs)
    get = proxy_method(LearningActor.get)
    cancel = proxy_method(LearningActor.cancel)
    stop_all = proxy_method(LearningActor.stop_all)


class GoalsProxy(ActorMemberMixin, pykka.ActorProxy[GoalActor]):
    """The goal actor: goals and their steps."""

    create = proxy_method(GoalActor.create)
    list_goals = proxy_method(GoalActor.list_goals)
    get = proxy_method(GoalActor.get)
    cancel = proxy_method(GoalActor.cancel)
    stop_all = proxy_method(GoalActor.stop_all)


P = TypeVar("P", bound=pykka.ActorProxy[Any])


def typed(ref: pykka.ActorRef[Any], kind: type[P]) -> P:
    """Return `ref`'s proxy seen as `kind` (the actor must be the one `kind` describes)."""
    return cast(P, ref.proxy())


__all__ = ["DeviceProxy", "GoalsProxy", "LearningProxy", "ManagerProxy", "typed"]
