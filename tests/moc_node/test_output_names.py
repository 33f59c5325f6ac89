"""A learning job's output never takes over a served model's name by accident (issue 13,
finding 3), through the node's HTTP API on a generated model, across a restart.
"""

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
from actors.serving.config import CatalogEntry
from moc_node.app import Runtime, build_runtime
from moc_node.config import Config
from moc_node.services import torch_available
from tests.moc_node.conftest import make_config
from transports.http import HttpServer

pytestmark = pytest.mark.skipif(not torch_available(), reason="the torch extra is not installed")

CORPUS = [f"The {a} sat on the {n}." for a in ("cat", "dog", "fox") for n in ("mat", "log")]
PARAMS = {"steps": 4, "lr": 0.01, "seq_len": 16, "batch_size": 2, "eval_fraction": 0.0}

Serve = Callable[[], Awaitable[tuple[Runtime, str]]]


@pytest.fixture
async def serve(tmp_path: Path, model_root: Path) -> AsyncIterator[Serve]:
    """Start the node (catalog model "a", preloaded) on one state dir, again after each stop."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "text.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in CORPUS))
    entry = CatalogEntry(name="a", path=str(model_root / "a.gguf"), n_ctx=256, preload=True)
    config: Config = make_config(tmp_path, model_root, catalog=(entry,))
    config = dataclasses.replace(
        config,
        server=dataclasses.replace(config.server, rest_port=0),
        learning=LearningConfig(dataset_dirs=(str(data),), torch_threads=1),
    )
    running: list[tuple[Runtime, HttpServer]] = []

    async def start() -> tuple[Runtime, str]:
        for runtime, http in running:  # one node at a time on the state dir
            await http.stop()
            await runtime.close()
        running.clear()
        runtime = build_runtime(config)
        await runtime.node.start()
        http = HttpServer(runtime.node, config.server)
        await http.start()
        running.append((runtime, http))
        return runtime, f"http://127.0.0.1:{http.port}"

    yield start
    for runtime, http in running:
        await http.stop()
        await runtime.close()


async def call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, url, json=body) as r:
        return r.status, await r.json()


async def until_done(url: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 240
    while True:
        status, job = await call("GET", f"{url}/learning/jobs/{job_id}")
        if job["status"] in ("completed", "failed", "cancelled"):
            return job  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.2)  # polling a condition with a deadline


def job_spec(root: Path, **extra: Any) -> dict[str, Any]:
    return {
        "job_type": "fine_tune",
        "model_name": "a",
        "dataset_path": str(root / "data" / "text.jsonl"),
        "training_params": PARAMS,
        **extra,
    }


async def test_a_job_whose_output_would_shadow_a_catalog_model_is_refused_before_any_work(
    serve: Serve, tmp_path: Path
) -> None:
    _, url = await serve()
    status, body = await call("POST", url + "/learning/jobs", job_spec(tmp_path, output_name="a"))
    assert status == 409, body
    assert (body["code"], body["field"]) == ("name_taken", "output_name")
    assert '"replace": true' in body["error"]
    status, listed = await call("GET", url + "/learning/jobs")
    assert listed["jobs"] == []  # nothing stored, nothing trained


async def test_replace_takes_the_name_and_the_served_version_identifies_the_new_weights(
    serve: Serve, tmp_path: Path
) -> None:
    runtime, url = await serve()
    before = runtime.node.model_info("a")
    assert before is not None and before.state == "loaded"
    spec = job_spec(tmp_path, output_name="a", replace=True)
    status, job = await call("POST", url + "/learning/jobs", spec)
    assert status == 201, job
    assert job["replace"] is True
    done = await until_done(url, job["job_id"])
    assert done["status"] == "completed", done["error"]

    # Loaded, "a" keeps its old weights until it is next loaded; then it serves the job's.
    assert (await call("DELETE", url + "/models/a"))[0] == 200
    status, loaded = await call("POST", url + "/models", {"model_name": "a"})
    assert status == 201, loaded
    assert loaded["path"] == done["output_path"]
    assert loaded["version"] != before.version
    status, answer = await call(
        "POST", url + "/inference", {"model_name": "a", "input_text": "The", "max_tokens": 2}
    )
    assert status == 200 and answer["model_version"] == loaded["version"], answer

    # After a restart the catalog name still means the replacement, with the same version.
    runtime, url = await serve()
    again = runtime.node.model_info("a")
    assert again is not None and again.state == "loaded"
    assert (again.path, again.version) == (done["output_path"], loaded["version"])
