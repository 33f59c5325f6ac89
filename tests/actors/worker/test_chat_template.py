"""Chat on a GGUF without a chat template falls back to ChatML, as llama.cpp's server does.

Through a real worker and through a real node's OpenAI front: the fallback answers the chat
(it answered 400 before), the worker reports which template it renders with, and /v1/models
shows it ("chatml" for the fallback, "model" for the file's own).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import aiohttp
import pytest

from actors.gguf_synth import write_preset
from actors.serving.config import CatalogEntry
from actors.types import ChatMessage, InferRequest
from moc_node.app import build_runtime
from tests.actors.worker.workers import greedy, run_request, worker_for
from tests.moc_node.conftest import make_config
from tests.transports.conftest import server_config
from transports.http import HttpServer

CHAT = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hello there"))
CHATML_TEXT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """plain.gguf (no tokenizer.chat_template) and templated.gguf, both the tiny preset."""
    root = tmp_path_factory.mktemp("chat-template-models")
    write_preset(root / "plain.gguf", "tiny", chat_template=False)
    write_preset(root / "templated.gguf", "tiny")
    return root


def test_a_worker_on_a_model_without_a_template_answers_chat_rendered_as_chatml(
    models: Path, runtime_dir: Path
) -> None:
    worker = worker_for(models / "plain.gguf", runtime_dir, "plain", n_ctx=256, n_threads=1)
    try:
        loaded = worker.start(timeout=60)
        assert loaded.chat_template == "chatml"
        assert worker.log_path is not None
        log = worker.log_path.read_text()  # removed when the worker exits cleanly
        assert "chat template: ChatML (the model has no tokenizer.chat_template)" in log
        chat = run_request(worker, InferRequest(model="plain", messages=CHAT, params=greedy(16)))
        # The ChatML text sent as a completion prompt: the same tokens (BOS first, the tags
        # parsed as control tokens), so the same greedy text.
        as_text = run_request(
            worker, InferRequest(model="plain", prompt=CHATML_TEXT, params=greedy(16))
        )
    finally:
        worker.stop()
    assert chat.text == as_text.text and chat.tokens_generated == 16
    assert chat.prompt_tokens == as_text.prompt_tokens


async def test_v1_models_names_each_models_chat_template_and_the_fallback_answers_a_chat(
    models: Path, tmp_path: Path
) -> None:
    catalog = tuple(
        CatalogEntry(name=name, path=str(models / f"{name}.gguf"), n_ctx=256, preload=True)
        for name in ("plain", "templated")
    )
    config = make_config(tmp_path, models, catalog=catalog)
    config = dataclasses.replace(config, server=server_config())
    runtime = build_runtime(config)
    http = HttpServer(runtime.node, config.server)
    await http.start()
    try:
        await runtime.node.start()
        url = f"http://127.0.0.1:{http.port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/v1/models") as resp:
                assert resp.status == 200
                listing = await resp.json()
            body = {
                "model": "plain",
                "messages": [{"role": m.role, "content": m.content} for m in CHAT],
                "max_tokens": 8,
                "temperature": 0.0,
            }
            async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                answer = await resp.json()
    finally:
        await http.stop()
        await runtime.close()
    templates = {m["id"]: m["chat_template"] for m in listing["data"]}
    assert templates == {"plain": "chatml", "templated": "model"}
    assert answer["usage"]["completion_tokens"] == 8
    assert len(answer["choices"][0]["message"]["content"]) == 8
