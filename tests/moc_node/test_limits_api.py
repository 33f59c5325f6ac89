"""Limits on what waits and what is kept, and paged lists, through a real node's HTTP and ZMQ.

Before them a client could park any number of jobs and goals (1,000 goals with 20 KB
descriptions were all accepted: `GET /goals` answered 20.5 MB and the node grew by 60 MB for
good). Now: a full queue answers 429 with Retry-After, a store full of open work 507, both
naming the limit; finished work is pruned oldest first past the stored cap; lists come in pages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio
from prometheus_client import REGISTRY

from actors.goals.config import GoalsConfig
from actors.learning.config import LearningConfig
from moc_node.app import Runtime, build_runtime
from moc_node.cli import _Client, _list_all
from moc_node.services import torch_available
from tests.moc_node.conftest import catalog_of, make_config
from tests.moc_node.test_learning_api import CORPUS, until
from tests.transports.conftest import server_config
from transports.http import HttpServer
from transports.zmq_legacy import ZmqServer

pytestmark = pytest.mark.skipif(not torch_available(), reason="the torch extra is not installed")

LONG = {"steps": 5000, "lr": 0.01, "seq_len": 32, "batch_size": 4, "lora_rank": 4}


@dataclasses.dataclass
class Served:
    runtime: Runtime
    url: str
    endpoint: str
    data: Path

    def job(self) -> dict[str, Any]:
        """A LoRA job spec long enough to stay open for the whole test (it is cancelled)."""
        return {
            "job_type": "lora",
            "model_name": "a",
            "dataset_path": str(self.data / "text.jsonl"),
            "training_params": LONG,
        }

    def goal(self, title: str = "better a", **fields: Any) -> dict[str, Any]:
        """A legacy goal whose long train step keeps it open (it is cancelled)."""
        metadata = {
            "model_name": "a",
            "dataset_path": str(self.data / "text.jsonl"),
            "training_params": LONG,
        }
        return {"title": title, "priority": "high", "metadata": metadata, **fields}


Start = Callable[..., Awaitable[Served]]


@pytest.fixture
async def start(tmp_path: Path, model_root: Path) -> AsyncIterator[Start]:
    """Start a real node with the given [learning] and [goals] limits, over HTTP and ZMQ."""
    running: list[tuple[Runtime, HttpServer, ZmqServer]] = []

    async def started(**limits: Any) -> Served:
        data = tmp_path / "data"
        data.mkdir(exist_ok=True)
        (data / "text.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in CORPUS))
        learning = {k: v for k, v in limits.items() if k in LearningConfig.__dataclass_fields__}
        goals = {k: v for k, v in limits.items() if k in GoalsConfig.__dataclass_fields__}
        config = make_config(tmp_path, model_root, catalog=catalog_of(model_root, "a"))
        config = dataclasses.replace(
            config,
            server=server_config(),
            learning=LearningConfig(
                dataset_dirs=(str(data),), torch_threads=1, max_parallel_jobs=1, **learning
            ),
            goals=GoalsConfig(poll_interval_s=0.05, **goals),
        )
        runtime = build_runtime(config)
        await runtime.node.start()
        http = HttpServer(runtime.node, config.server)
        await http.start()
        zmq_server = ZmqServer(runtime.node, config.server)
        await zmq_server.start()
        running.append((runtime, http, zmq_server))
        return Served(runtime, f"http://127.0.0.1:{http.port}", zmq_server.endpoint, data)

    yield started
    for runtime, http, zmq_server in reversed(running):
        await http.stop()
        await zmq_server.stop()
        await runtime.close()


async def call(method: str, url: str, body: Any = None) -> tuple[int, Any, str | None]:
    """Return the status, the JSON body and the Retry-After header of one request."""
    async with aiohttp.ClientSession() as session, session.request(method, url, json=body) as r:
        return r.status, await r.json(), r.headers.get("Retry-After")


async def until_created(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST until it is accepted (room is made as a cancel finishes); return what was made."""
    made: dict[str, Any] = {}

    async def accepted() -> bool:
        status, reply, _ = await call("POST", url, body)
        if status == 201:
            made.update(reply)
        return status == 201

    await until(accepted, 30.0, f"POST {url} to be accepted")
    return made


def refusals(reason: str) -> float:
    value = REGISTRY.get_sample_value("moc_goals_refused_total", {"reason": reason})
    return value or 0.0


async def zmq_call(endpoint: str, action: str, payload: dict[str, Any]) -> Any:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.REQ)
    sock.connect(endpoint)
    try:
        await sock.send_json({"action": action, "payload": payload, "request_id": "r"})
        assert await sock.poll(10_000), f"no reply to {action}"
        return await sock.recv_json()
    finally:
        sock.close(linger=0)
        ctx.term()


async def test_a_job_past_the_queue_limit_is_refused_with_429_naming_it_and_retry_after(
    start: Start,
) -> None:
    served = await start(max_queued_jobs=1)
    jobs = served.url + "/learning/jobs"
    # One runs (max_parallel_jobs 1) or waits for memory, one more waits: the queue is full.
    ids = []
    refused = None
    for _ in range(3):
        status, body, retry_after = await call("POST", jobs, served.job())
        if status == 201:
            ids.append(body["job_id"])
        else:
            refused = (status, body, retry_after)
            break
    assert refused is not None, "three jobs were accepted with max_queued_jobs = 1"
    status, body, retry_after = refused
    assert status == 429, body
    assert body["code"] == "too_many_jobs"
    assert "learning.max_queued_jobs = 1" in body["error"]
    assert retry_after == "60"
    for job_id in ids:
        await call("POST", f"{jobs}/{job_id}/cancel")
    status, body, _ = await call("POST", jobs, served.job())  # the queue has moved
    assert status == 201, body
    await call("POST", f"{jobs}/{body['job_id']}/cancel")


async def test_a_store_full_of_open_jobs_answers_507_and_finished_ones_are_pruned_oldest_first(
    start: Start,
) -> None:
    served = await start(max_stored_jobs=1)
    jobs = served.url + "/learning/jobs"
    status, first, _ = await call("POST", jobs, served.job())
    assert status == 201, first
    status, body, _ = await call("POST", jobs, served.job())
    assert status == 507, body
    assert body["code"] == "job_store_full"
    assert "learning.max_stored_jobs = 1" in body["error"]
    await call("POST", f"{jobs}/{first['job_id']}/cancel")
    second = await until_created(jobs, served.job())  # the cancelled one makes room
    status, body, _ = await call("GET", f"{jobs}/{first['job_id']}")
    assert status == 404, body  # pruned
    status, listing, _ = await call("GET", jobs)
    assert [j["job_id"] for j in listing["jobs"]] == [second["job_id"]]
    await call("POST", f"{jobs}/{second['job_id']}/cancel")


async def test_a_goal_past_the_open_limit_is_refused_with_429_and_taken_once_one_is_over(
    start: Start,
) -> None:
    served = await start(max_open_goals=1)
    goals = served.url + "/goals"
    status, first, _ = await call("POST", goals, served.goal("first"))
    assert status == 201, first
    refused = refusals("too_many_goals")
    status, body, retry_after = await call("POST", goals, served.goal("second"))
    assert status == 429, body
    assert body["code"] == "too_many_goals"
    assert refusals("too_many_goals") == refused + 1
    assert "goals.max_open_goals = 1" in body["error"]
    assert retry_after == "30"
    await call("POST", f"{goals}/{first['goal_id']}/cancel")
    status, second, _ = await call("POST", goals, served.goal("second"))
    assert status == 201, second
    await call("POST", f"{goals}/{second['goal_id']}/cancel")


async def test_a_store_full_of_open_goals_answers_507_and_finished_ones_are_pruned(
    start: Start,
) -> None:
    served = await start(max_stored_goals=1)
    goals = served.url + "/goals"
    status, first, _ = await call("POST", goals, served.goal("first"))
    assert status == 201, first
    status, body, _ = await call("POST", goals, served.goal("second"))
    assert status == 507, body
    assert body["code"] == "goal_store_full"
    assert "goals.max_stored_goals = 1" in body["error"]
    await call("POST", f"{goals}/{first['goal_id']}/cancel")
    second = await until_created(goals, served.goal("second"))  # once its job has stopped
    assert (await call("GET", f"{goals}/{first['goal_id']}"))[0] == 404
    await call("POST", f"{goals}/{second['goal_id']}/cancel")


async def test_a_long_description_or_large_metadata_is_refused_with_400_naming_the_limit(
    start: Start,
) -> None:
    served = await start(max_description_chars=100, max_metadata_bytes=1000)
    goals = served.url + "/goals"
    status, body, _ = await call("POST", goals, served.goal(description="x" * 101))
    assert status == 400, body
    assert body["field"] == "description"
    assert "goals.max_description_chars" in body["error"]
    big = served.goal()
    big["metadata"]["notes"] = "y" * 1000
    status, body, _ = await call("POST", goals, big)
    assert status == 400, body
    assert body["field"] == "metadata" and "goals.max_metadata_bytes" in body["error"]
    status, listing, _ = await call("GET", goals)
    assert listing["goals"] == []
    status, body, _ = await call("POST", goals, served.goal(description="x" * 100))
    assert status == 201, body
    await call("POST", f"{goals}/{body['goal_id']}/cancel")


async def test_goal_and_job_lists_come_in_pages_over_http_zmq_and_the_cli(start: Start) -> None:
    served = await start()
    goals = served.url + "/goals"
    made = []
    for i in range(5):  # a plan that is over at once: unloading a model that is not loaded
        body = {"title": f"g{i}", "steps": [{"kind": "unload", "model": "nothing"}]}
        status, goal, _ = await call("POST", goals, body)
        assert status == 201, goal
        made.append(goal["goal_id"])

    status, page, _ = await call("GET", goals + "?limit=2")
    assert status == 200
    assert [g["goal_id"] for g in page["goals"]] == made[:2]
    assert (page["limit"], page["offset"], page["next_offset"]) == (2, 0, 2)
    status, last, _ = await call("GET", goals + "?limit=2&offset=4")
    assert [g["goal_id"] for g in last["goals"]] == made[4:]
    assert last["next_offset"] is None
    status, whole, _ = await call("GET", goals)  # no paging asked: the first 100
    assert [g["goal_id"] for g in whole["goals"]] == made and whole["next_offset"] is None

    reply = await zmq_call(served.endpoint, "list_goals", {"limit": 3, "offset": 3})
    assert reply["success"], reply
    assert [g["goal_id"] for g in reply["result"]["goals"]] == made[3:]
    assert reply["result"]["next_offset"] is None

    client = _Client(served.url, None)
    listed = await _in_thread(lambda: _list_all(client, "/goals", "goals", page=2))
    assert [g["goal_id"] for g in listed] == made

    jobs = served.url + "/learning/jobs"
    job_ids = []
    for _ in range(3):
        status, job, _ = await call("POST", jobs, served.job())
        assert status == 201, job
        job_ids.append(job["job_id"])
        await call("POST", f"{jobs}/{job['job_id']}/cancel")
    status, page, _ = await call("GET", jobs + "?limit=2&offset=1")
    assert [j["job_id"] for j in page["jobs"]] == job_ids[1:]
    assert page["next_offset"] is None
    listed = await _in_thread(lambda: _list_all(client, "/learning/jobs", "jobs", page=1))
    assert [j["job_id"] for j in listed] == job_ids


BAD_PAGES = ("limit=0", "limit=1001", "limit=abc", "limit=-1", "offset=-3", "offset=1.5", "limit=%201")


async def test_a_bad_page_is_refused_with_400_naming_the_field(start: Start) -> None:
    served = await start()
    for query in BAD_PAGES:
        for path in ("/goals", "/learning/jobs", "/models"):
            status, body, _ = await call("GET", f"{served.url}{path}?{query}")
            assert status == 400, (path, query, body)
            assert body["field"] == query.split("=")[0]
    reply = await zmq_call(served.endpoint, "list_models", {"limit": True})
    assert not reply["success"] and "limit" in reply["error"]
    status, models, _ = await call("GET", served.url + "/models?limit=1")
    assert status == 200 and [m["model_name"] for m in models["models"]] == ["a"]
    assert models["next_offset"] is None


async def _in_thread(work: Callable[[], Any]) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, work)


def test_the_cli_follows_next_offset_and_stops_on_a_node_without_paging() -> None:
    pages = {
        "/goals?limit=2&offset=0": {"goals": [1, 2], "next_offset": 2},
        "/goals?limit=2&offset=2": {"goals": [3], "next_offset": None},
        "/old?limit=2&offset=0": {"old": [1, 2, 3]},  # a node from before paging
        "/bare?limit=2&offset=0": [4, 5],
    }

    class Fake(_Client):
        def __init__(self) -> None:
            super().__init__("http://unused", None)

        def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
            return pages[path]

    assert _list_all(Fake(), "/goals", "goals", page=2) == [1, 2, 3]
    assert _list_all(Fake(), "/old", "old", page=2) == [1, 2, 3]
    assert _list_all(Fake(), "/bare", "bare", page=2) == [4, 5]
