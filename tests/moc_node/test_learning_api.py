"""Learning jobs and goals through the node's HTTP API, end to end on a generated model."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from actors.learning.config import LearningConfig
from moc_node.app import Runtime, build_runtime
from moc_node.services import torch_available
from tests.moc_node.conftest import catalog_of, make_config
from transports.http import HttpServer

pytestmark = pytest.mark.skipif(not torch_available(), reason="the torch extra is not installed")

CORPUS = [
    f"The {a} {v} on the {n}. The {n} was {c}."
    for a in ("cat", "dog", "bird", "fox")
    for v in ("sat", "slept", "stood")
    for n, c in (("mat", "red"), ("log", "brown"), ("rug", "blue"))
]
PARAMS = {"steps": 30, "lr": 0.01, "seq_len": 32, "batch_size": 4, "lora_rank": 4}


@pytest.fixture
async def api(tmp_path: Path, model_root: Path) -> AsyncIterator[tuple[Runtime, str, Path]]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "text.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in CORPUS))
    config = make_config(tmp_path, model_root, catalog=catalog_of(model_root, "a"))
    config = dataclasses.replace(
        config,
        server=dataclasses.replace(config.server, rest_port=0),
        learning=LearningConfig(dataset_dirs=(str(data),), torch_threads=1, checkpoint_every=10),
    )
    runtime = build_runtime(config)
    await runtime.node.start()
    http = HttpServer(runtime.node, config.server)
    await http.start()
    yield runtime, f"http://127.0.0.1:{http.port}", data
    await http.stop()
    await runtime.close()


async def call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, url, json=body) as r:
        return r.status, await r.json()


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)  # polling a condition with a deadline


async def test_a_lora_job_trains_registers_its_adapter_and_the_node_serves_it(
    api: tuple[Runtime, str, Path],
) -> None:
    runtime, url, data = api
    spec = {
        "job_type": "lora",
        "model_name": "a",
        "dataset_path": str(data / "text.jsonl"),
        "training_params": PARAMS,
        "output_name": "a-cats",
    }
    status, job = await call("POST", url + "/learning/jobs", spec)
    assert status == 201, job
    job_url = f"{url}/learning/jobs/{job['job_id']}"

    async def finished() -> bool:
        return (await call("GET", job_url))[1]["status"] in ("completed", "failed", "cancelled")

    await until(finished, 240, "the job")
    status, done = await call("GET", job_url)
    assert done["status"] == "completed", done.get("error")
    assert done["loss_history"][-1][1] < done["loss_history"][0][1]  # [step, loss] pairs
    status, listed = await call("GET", url + "/learning/jobs")
    assert job["job_id"] in [j["job_id"] for j in listed["jobs"]]

    status, body = await call(
        "POST", url + "/v1/completions", {"model": "a-cats", "prompt": "The cat", "max_tokens": 8}
    )
    assert status == 200, body
    info = runtime.node.model_info("a-cats")
    assert info is not None and info.state == "loaded"


async def test_bad_job_specs_and_incomplete_legacy_goals_are_refused_naming_what_is_wrong(
    api: tuple[Runtime, str, Path],
) -> None:
    _, url, data = api
    status, body = await call(
        "POST", url + "/learning/jobs", {"job_type": "dream", "model_name": "a"}
    )
    assert status == 400 and "job_type" in json.dumps(body)
    status, body = await call(
        "POST",
        url + "/learning/jobs",
        {"job_type": "lora", "model_name": "a", "dataset_path": "/etc/passwd"},
    )
    assert status in (400, 403), body
    status, body = await call(
        "POST", url + "/goals", {"title": "t", "metadata": {"model_name": "a"}}
    )
    assert status == 400 and "dataset_path" in json.dumps(body)
    status, body = await call("GET", url + "/learning/jobs/nope")
    assert status == 404


async def test_a_legacy_goal_trains_evaluates_gates_and_deploys(
    api: tuple[Runtime, str, Path],
) -> None:
    runtime, url, data = api
    goal = {
        "title": "teach a about cats",
        "priority": "high",
        "metadata": {
            "model_name": "a",
            "dataset_path": str(data / "text.jsonl"),
            "training_params": {**PARAMS, "steps": 40, "eval_fraction": 0.0},
            "min_improvement": 0.05,
        },
    }
    status, created = await call("POST", url + "/goals", goal)
    assert status == 201, created
    goal_url = f"{url}/goals/{created['goal_id']}"

    async def ended() -> bool:
        return (await call("GET", goal_url))[1]["status"] in ("completed", "failed", "cancelled")

    await until(ended, 300, "the goal")
    _, done = await call("GET", goal_url)
    assert done["status"] == "completed", done.get("error")
    deployed = [m.name for m in runtime.node.models() if m.state == "loaded" and "@goal-" in m.name]
    assert deployed, "the gated candidate was not deployed"


async def test_the_cli_submits_watches_and_lists_jobs_and_goals(
    api: tuple[Runtime, str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from moc_node.cli import main

    _, url, data = api
    loop = asyncio.get_running_loop()
    argv = [
        "jobs",
        "submit",
        "--model",
        "a",
        "--dataset",
        str(data / "text.jsonl"),
        "--steps",
        "6",
        "--output-name",
        "a-cli",
        "--url",
        url,
    ]
    assert await loop.run_in_executor(None, main, argv) == 0
    assert "job completed: model a-cli is servable" in capsys.readouterr().out
    assert await loop.run_in_executor(None, main, ["jobs", "--url", url]) == 0
    assert "a-cli" in capsys.readouterr().out
    assert await loop.run_in_executor(None, main, ["goals", "--url", url]) == 0
    assert "goals" in capsys.readouterr().out
