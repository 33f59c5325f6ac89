"""The legacy REST routes: each calls one action of `transports.dispatch`'s table."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from transports import schema
from transports.auth import public_health
from transports.dispatch import health_view
from transports.http_bodies import dispatcher_of, json_response, read_json
from transports.http_middleware import AUTHENTICATED_KEY
from transports.metrics import render

__all__ = ["add_routes"]


def add_routes(r: web.UrlDispatcher) -> None:
    """Add the legacy routes to `r`."""
    r.add_get("/health", _health)
    r.add_get("/ready", _ready)
    r.add_get("/metrics", _metrics)
    r.add_get("/status", _status)
    r.add_get("/devices", _devices)
    r.add_post("/inference", _inference)
    r.add_get("/models", _list_models)
    r.add_post("/models", _load_model)
    r.add_delete("/models/{model_name}", _unload_model)
    r.add_get("/learning/jobs", _collection("list_jobs"))
    r.add_post("/learning/jobs", _create("create_job"))
    r.add_get("/learning/jobs/{job_id}", _item("get_job", "job_id"))
    r.add_post("/learning/jobs/{job_id}/cancel", _item("cancel_job", "job_id"))
    r.add_delete("/learning/jobs/{job_id}", _item("cancel_job", "job_id"))
    r.add_get("/goals", _collection("list_goals"))
    r.add_post("/goals", _create("create_goal"))
    r.add_get("/goals/{goal_id}", _item("get_goal", "goal_id"))
    r.add_post("/goals/{goal_id}/cancel", _item("cancel_goal", "goal_id"))
    r.add_delete("/goals/{goal_id}", _item("cancel_goal", "goal_id"))
    r.add_get("/cluster", _cluster)


async def _health(request: web.Request) -> web.Response:
    report = dispatcher_of(request).node.health()
    body = health_view(report)
    if not request.get(AUTHENTICATED_KEY, False):
        body = public_health(body)  # open to anyone: details may name files
    # Load balancers act on the status code; the body keeps the legacy fields.
    return json_response(body, status=503 if report.status == "unhealthy" else 200)


async def _ready(request: web.Request) -> web.Response:
    ready = dispatcher_of(request).node.is_ready()
    return json_response({"ready": ready}, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    data, content_type = render()
    return web.Response(body=data, headers={"Content-Type": content_type})


async def _status(request: web.Request) -> web.Response:
    return json_response(await dispatcher_of(request).call("status", {}))


async def _devices(request: web.Request) -> web.Response:
    return json_response(await dispatcher_of(request).call("list_devices", {}))


async def _inference(request: web.Request) -> web.Response:
    body = schema.require_object(await read_json(request), "body")
    return json_response(await dispatcher_of(request).call("infer", body))


async def _list_models(request: web.Request) -> web.Response:
    return json_response(await dispatcher_of(request).call("list_models", _page_query(request)))


def _page_query(request: web.Request) -> dict[str, str]:
    """Return a list request's paging parameters (`?limit=&offset=`); others are ignored."""
    return {key: request.query[key] for key in ("limit", "offset") if key in request.query}


async def _load_model(request: web.Request) -> web.Response:
    body = schema.require_object(await read_json(request), "body")
    return json_response(await dispatcher_of(request).call("load_model", body), status=201)


async def _unload_model(request: web.Request) -> web.Response:
    name = request.match_info["model_name"]
    return json_response(await dispatcher_of(request).call("unload_model", {"model_name": name}))


async def _cluster(request: web.Request) -> web.Response:
    return json_response(await dispatcher_of(request).call("cluster", {}))


def _collection(action: str) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        return json_response(await dispatcher_of(request).call(action, _page_query(request)))

    return handle


def _create(action: str) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        body = schema.require_object(await read_json(request), "body")
        return json_response(await dispatcher_of(request).call(action, body), status=201)

    return handle


def _item(action: str, key: str) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        return json_response(await dispatcher_of(request).call(action, {key: request.match_info[key]}))

    return handle

