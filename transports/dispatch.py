"""One action table, shared by the ZeroMQ and HTTP fronts, and the JSON views of its results.

An action takes a validated payload, calls the node through `NodeAPI` and returns JSON-ready data;
errors map to what a client sees in `transports.errors`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from actors import names
from actors.errors import (
    InvalidRequest,
    MocError,
    RequestTimeout,
)
from actors.types import (
    DeviceInfo,
    HealthReport,
    InferRequest,
    InferResult,
    LoadRequest,
    ModelInfo,
    TokenChunk,
)
from transports import schema
from transports.api import NodeAPI
from transports.config import ServerConfig
from transports.errors import UnknownAction
from transports.tensors import tensor_view

__all__ = [
    "ACTIONS",
    "ActionHandler",
    "LEGACY_FIELDS",
    "Action",
    "device_view",
    "Dispatcher",
    "health_view",
    "infer_result_view",
    "legacy_field_error",
    "lookup_action",
    "model_view",
    "paged",
    "View",
]

T = TypeVar("T")


ActionHandler = Callable[["Dispatcher", Mapping[str, Any]], Awaitable[Any]]
View = Callable[["Dispatcher", Mapping[str, Any]], Any]


@dataclass(frozen=True, slots=True)
class Action:
    """One entry of the table."""

    name: str
    handler: ActionHandler
    view: View | None = None
    """The same answer computed without awaiting anything, when the action has one: a transport
    may then answer inside its receive callback, with no task. An action without a view may
    wait (on a worker, a load, or an actor reply that holds an executor thread, as the jobs and
    goals actions do): transports run it as a bounded task."""


class Dispatcher:
    """Run table actions against one node, with the configured timeouts."""

    def __init__(
        self, node: NodeAPI, config: ServerConfig, *, limit_s: float | None = None
    ) -> None:
        """`limit_s`: a client's own deadline, which no timeout of this dispatcher passes."""
        self.node = node
        self.config = config
        self.request_timeout_s = _capped(config.request_timeout_s, limit_s)
        self.load_timeout_s = _capped(config.load_timeout_s, limit_s)

    def action(self, name: Any) -> Action:
        """Return the table entry for `name`; raise UnknownAction otherwise."""
        return lookup_action(name)

    async def call(self, name: str, payload: Mapping[str, Any]) -> Any:
        """Run the action `name` with `payload` and return its JSON-ready result."""
        return await lookup_action(name).handler(self, payload)

    def within(self, seconds: float | None) -> Dispatcher:
        """Return a dispatcher whose timeouts end within `seconds` (a client's own deadline).

        None, or a deadline past the configured timeouts, returns this dispatcher.
        """
        if seconds is None or seconds >= max(self.request_timeout_s, self.load_timeout_s):
            return self
        return Dispatcher(self.node, self.config, limit_s=seconds)

    def with_deadline(self, req: InferRequest) -> InferRequest:
        """Give `req` the configured request timeout unless it carries its own."""
        if req.timeout_s is None:
            return dataclasses.replace(req, timeout_s=self.request_timeout_s)
        return req

    async def infer(self, req: InferRequest) -> InferResult:
        """Run one inference to the end within its deadline."""
        req = self.with_deadline(req)
        assert req.timeout_s is not None
        return await _within(self.node.infer(req), req.timeout_s, "inference")

    async def stream(self, req: InferRequest) -> AsyncIterator[TokenChunk | InferResult]:
        """Yield the pieces of one inference, then its InferResult, within its deadline.

        Closing this iterator (or cancelling its consumer) closes the node's stream, which is
        what cancels the generation.
        """
        req = self.with_deadline(req)
        assert req.timeout_s is not None
        deadline = asyncio.get_running_loop().time() + req.timeout_s
        items = self.node.infer_stream(req)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        item = await anext(items)
                except TimeoutError:
                    raise RequestTimeout(
                        f"inference did not finish within {req.timeout_s:g} s"
                    ) from None
                except StopAsyncIteration:
                    raise MocError("the node ended the stream without a result") from None
                yield item
                if isinstance(item, InferResult):
                    return
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()

    async def load(self, req: LoadRequest) -> ModelInfo:
        """Load a model; past the load timeout the client gets 504 while the load goes on."""
        return await _within(
            asyncio.shield(self.node.load(req)), self.load_timeout_s, "load"
        )

    async def unload(self, name: str) -> ModelInfo:
        """Unload a model; past the load timeout the client gets 504 while the unload goes on."""
        return await _within(
            asyncio.shield(self.node.unload(name)), self.load_timeout_s, "unload"
        )


def _capped(seconds: float, limit: float | None) -> float:
    return seconds if limit is None else min(seconds, limit)


async def _within(aw: Awaitable[T], seconds: float, what: str) -> T:
    try:
        async with asyncio.timeout(seconds):
            return await aw
    except TimeoutError:
        raise RequestTimeout(f"{what} did not finish within {seconds:g} s") from None


# ---- JSON views of the domain values (the reply fields are part of the contract) ----


def infer_result_view(result: InferResult) -> dict[str, Any]:
    """Return the legacy infer result: output_text, tokens_generated, latency_ms, model_version.

    A torch model's result adds `output_tensors`.
    """
    view = {
        "output_text": result.text,
        "tokens_generated": result.tokens_generated,
        "prompt_tokens": result.prompt_tokens,
        "finish_reason": result.finish_reason,
        "latency_ms": result.latency_ms,
        "model_version": result.model_version,
    }
    if result.tensors is not None:
        view["output_tensors"] = [tensor_view(t) for t in result.tensors]
    return view


# Every field of ModelInfo and DeviceInfo is a scalar, so reading the fields gives what
# dataclasses.asdict gives, without its recursive deep copy (list_models is a hot action).
_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelInfo))
_DEVICE_FIELDS = tuple(f.name for f in dataclasses.fields(DeviceInfo))


def model_view(info: ModelInfo) -> dict[str, Any]:
    """Return one model as JSON, with the legacy names `model_name` and `memory_usage_mb`."""
    view = {name: getattr(info, name) for name in _MODEL_FIELDS}
    view["model_name"] = info.name
    view["memory_usage_mb"] = info.memory_mb
    return view


def device_view(info: DeviceInfo) -> dict[str, Any]:
    """Return one device as JSON; simulated devices say so in `label` and `simulated`."""
    view = {name: getattr(info, name) for name in _DEVICE_FIELDS}
    view["label"] = info.label
    view["simulated"] = info.simulated
    return view


def health_view(report: HealthReport, now: float | None = None) -> dict[str, Any]:
    """Return the legacy health body: status, ISO-8601 timestamp, per-component status."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
    return {
        "status": report.status,
        "timestamp": stamp.isoformat(),
        "components": {
            name: {"status": c.status, "detail": c.detail} for name, c in report.components.items()
        },
    }


# ---- the table ----


# The request fields as the legacy infer payload names them (the node names them as
# InferRequest and the OpenAI surface do: prompt, messages, stop, tensors).
LEGACY_FIELDS = {"prompt": "input_text", "stop": "stop_sequences", "tensors": "input_tensors"}


async def _infer(d: Dispatcher, payload: Mapping[str, Any]) -> Any:
    try:
        return infer_result_view(await d.infer(schema.parse_infer(payload)))
    except InvalidRequest as exc:
        raise legacy_field_error(exc) from None


def legacy_field_error(exc: InvalidRequest) -> InvalidRequest:
    """Return `exc` naming the field as the legacy payload does (input_text, not prompt)."""
    legacy = LEGACY_FIELDS.get(exc.field)
    if legacy is None:
        return exc
    return InvalidRequest(legacy, str(exc).removeprefix(f"{exc.field}: "))


async def _load(d: Dispatcher, payload: Mapping[str, Any]) -> Any:
    info = await d.load(schema.parse_load(payload))
    return {**model_view(info), "status": "loaded"}


async def _unload(d: Dispatcher, payload: Mapping[str, Any]) -> Any:
    info = await d.unload(schema.parse_model_name(payload))
    return {**model_view(info), "status": "unloaded"}


def paged(key: str, window: Sequence[Any], page: schema.Page) -> dict[str, Any]:
    """Return one page under `key`, with where the next page starts.

    `window` holds the items from `page.offset` on: `page.limit + 1` of them when there are
    more (the one past the page says so, without counting the whole table). The legacy shape
    (`{key: [...]}`) is kept and fields are added: `limit`, `offset` and `next_offset` (null
    on the last page); a client that ignores them reads the first page.
    """
    more = len(window) > page.limit
    return {
        key: list(window[: page.limit]),
        "limit": page.limit,
        "offset": page.offset,
        "next_offset": page.offset + page.limit if more else None,
    }


def _list_models(d: Dispatcher, payload: Mapping[str, Any]) -> Any:
    page = schema.parse_page(payload)
    view = paged("models", d.node.models()[page.offset :], page)
    view["models"] = [model_view(m) for m in view["models"]]
    return view


def _list_devices(d: Dispatcher, payload: Mapping[str, Any]) -> Any:
    return {"devices": [device_view(x) for x in d.node.devices()]}


def _health(d: Dispatcher, payload: Mapping[str, Any]) -> Any:
    return health_view(d.node.health())


def _ready(d: Dispatcher, payload: Mapping[str, Any]) -> Any:
    return {"ready": d.node.is_ready()}


def _status(d: Dispatcher, payload: Mapping[str, Any]) -> Any:
    return d.node.status()


def _cluster(d: Dispatcher, payload: Mapping[str, Any]) -> Any:
    return d.node.cluster_view()


def _id(payload: Mapping[str, Any], field: str) -> str:
    value = payload.get(field)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(field, "is required and must be a non-empty string")
    # Ids are names too: one with a lone surrogate could not even be looked up in SQLite.
    return names.check_name(value, field)


async def _list_jobs(d: Dispatcher, payload: Mapping[str, Any]) -> Any:
    page = schema.parse_page(payload)
    return paged("jobs", await d.node.list_jobs(page.limit + 1, page.offset), page)


async def _create_job(d: Dispatcher, payload: Mapping[str, Any]) -> Any:
    return await d.node.create_job(dict(payload))


async def _get_job(d: Dispatcher, payload: Mapping[str, Any]) -> Any:
    return await d.node.get_job(_id(payload, "job_id"))


async def _cancel_job(d: Dispatcher, payload: Mapping[str, Any]) -> Any:
    return await d.node.cancel_job(_id(payload, "job_id"))


async def _list_goals(d: Dispatcher, payload: Mapping[str, Any]) -> Any:
    page = schema.parse_page(payload)
    return paged("goals", await d.node.list_goals(page.limit + 1, page.offset), page)


async def _create_goal(d: Dispatcher, payload: Mapping[str, Any]) -> Any:
    return await d.node.create_goal(dict(payload))


async def _get_goal(d: Dispatcher, payload: Mapping[str, Any]) -> Any:
    return await d.node.get_goal(_id(payload, "goal_id"))


async def _cancel_goal(d: Dispatcher, payload: Mapping[str, Any]) -> Any:
    return await d.node.cancel_goal(_id(payload, "goal_id"))


def _at_once(name: str, view: View) -> Action:
    """An action answered from the node's state without waiting: its handler wraps its view."""

    async def handler(d: Dispatcher, payload: Mapping[str, Any]) -> Any:
        return view(d, payload)

    return Action(name, handler, view=view)


ACTIONS: dict[str, Action] = {
    a.name: a
    for a in (
        Action("infer", _infer),
        Action("load_model", _load),
        Action("unload_model", _unload),
        _at_once("list_models", _list_models),
        _at_once("health", _health),
        _at_once("status", _status),
        _at_once("list_devices", _list_devices),
        _at_once("ready", _ready),
        _at_once("cluster", _cluster),
        Action("list_jobs", _list_jobs),
        Action("create_job", _create_job),
        Action("get_job", _get_job),
        Action("cancel_job", _cancel_job),
        Action("list_goals", _list_goals),
        Action("create_goal", _create_goal),
        Action("get_goal", _get_goal),
        Action("cancel_goal", _cancel_goal),
    )
}

def lookup_action(name: Any) -> Action:
    """Return the table entry for `name`; raise InvalidRequest or UnknownAction otherwise."""
    if not isinstance(name, str) or not name:
        raise InvalidRequest("action", "is required and must be a string")
    found = ACTIONS.get(name)
    if found is not None:
        return found
    raise UnknownAction(f"unknown action {name!r}; known actions: {', '.join(sorted(ACTIONS))}")
