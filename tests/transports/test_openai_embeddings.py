"""POST /v1/embeddings through a real node, with the official `openai` client.

One node (real actors, real llama.cpp and torch workers, the real HTTP front) serves the module:
the generated tiny GGUF (n_embd 64) and a traced torch program, which has no embeddings.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from actors.gguf_synth import BYTE_BASE, write_preset
from actors.serving.config import CatalogEntry
from moc_node.app import Runtime, build_runtime
from tests.moc_node.conftest import make_config
from tests.transports.conftest import server_config
from transports.http import HttpServer

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torch.jit, as legacy fleets ship
]

MODEL = "tiny"
N_EMBD = 64  # the tiny preset's


@dataclass
class Served:
    client: openai.AsyncOpenAI
    runtime: Runtime


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    import torch

    root = tmp_path_factory.mktemp("embed-models")
    path = write_preset(root / "tiny.gguf", "tiny", seed=1)
    weight = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    torch.jit.trace(lambda x: x @ weight, torch.zeros(1, 4)).save(str(root / "affine.pt"))
    catalog = (
        CatalogEntry(name=MODEL, path=str(path), n_ctx=256, preload=True),
        CatalogEntry(name="affine", path=str(root / "affine.pt"), backend="torch"),
    )
    runtime = build_runtime(make_config(tmp_path_factory.mktemp("embed-node"), root, catalog=catalog))
    http = HttpServer(runtime.node, server_config())
    await http.start()
    await runtime.node.start()
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{http.port}/v1", api_key="unused", max_retries=0, timeout=60
    )
    yield Served(client, runtime)
    await client.close()
    await http.stop()
    await runtime.close()


def distance(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


async def test_a_string_gets_one_unit_vector_of_the_models_width(served: Served) -> None:
    answer = await served.client.embeddings.create(model=MODEL, input="hello world")
    (item,) = answer.data
    assert (item.object, item.index, len(item.embedding)) == ("embedding", 0, N_EMBD)
    assert math.isclose(math.fsum(v * v for v in item.embedding), 1.0, rel_tol=1e-5)
    assert answer.model == MODEL
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > 0


async def test_a_list_gets_a_vector_per_input_equal_for_equal_texts(served: Served) -> None:
    answer = await served.client.embeddings.create(
        model=MODEL, input=["the cat sat", "a dog ran off", "the cat sat"]
    )
    first, other, again = (d.embedding for d in answer.data)
    assert [d.index for d in answer.data] == [0, 1, 2]
    assert distance(first, again) < 1e-4  # one batch, two sequences: llama.cpp's rounding
    assert distance(first, other) > 0.01
    alone = (await served.client.embeddings.create(model=MODEL, input="the cat sat")).data[0]
    assert distance(alone.embedding, first) < 1e-3


async def test_base64_carries_the_same_little_endian_floats(served: Served) -> None:
    # The client asks for base64 unless told otherwise, and decodes it: read both raw.
    answers = {}
    for encoding in ("float", "base64"):
        raw = await served.client.embeddings.with_raw_response.create(
            model=MODEL, input="x y z", encoding_format=encoding  # type: ignore[arg-type]
        )
        answers[encoding] = raw.http_response.json()["data"][0]["embedding"]
    as_floats, as_base64 = answers["float"], answers["base64"]
    assert isinstance(as_floats, list) and isinstance(as_base64, str)
    decoded = struct.unpack(f"<{N_EMBD}f", base64.b64decode(as_base64))
    assert list(decoded) == as_floats
    parsed = (await served.client.embeddings.create(model=MODEL, input="x y z")).data[0]
    assert parsed.embedding == as_floats


async def test_token_ids_embed_as_their_text_does(served: Served) -> None:
    text = (await served.client.embeddings.create(model=MODEL, input="Hi")).data[0]
    ids = [1] + [BYTE_BASE + b for b in b"Hi"]  # BOS, then one byte token per character
    tokens = await served.client.embeddings.create(model=MODEL, input=ids)
    assert distance(tokens.data[0].embedding, text.embedding) < 1e-6


async def test_the_models_dimensions_are_accepted_and_others_refused(served: Served) -> None:
    same = await served.client.embeddings.create(model=MODEL, input="a", dimensions=N_EMBD)
    assert len(same.data[0].embedding) == N_EMBD
    with pytest.raises(openai.BadRequestError) as caught:
        await served.client.embeddings.create(model=MODEL, input="a", dimensions=32)
    assert caught.value.body["param"] == "dimensions"  # type: ignore[index]


@pytest.mark.parametrize(
    ("request_", "status", "param"),
    [
        ({"model": "nope", "input": "a"}, 404, None),
        ({"model": "affine", "input": "a"}, 400, "model"),
        ({"model": MODEL, "input": ""}, 400, "input"),
        ({"model": MODEL, "input": []}, 400, "input"),
        ({"model": MODEL, "input": ["a", ""]}, 400, "input[1]"),
        ({"model": MODEL, "input": "a" * 300}, 400, "input"),  # past the 256-token context
    ],
    ids=["unknown model", "torch model", "empty", "empty list", "empty second", "too long"],
)
async def test_what_cannot_be_embedded_is_refused(
    served: Served, request_: dict[str, Any], status: int, param: str | None
) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        await served.client.embeddings.create(**request_)
    assert caught.value.status_code == status
    assert caught.value.body["param"] == param  # type: ignore[index]


async def test_embeddings_are_counted_like_any_request(served: Served) -> None:
    def count() -> float:
        value = REGISTRY.get_sample_value(
            "moc_inference_requests_total", {"model": MODEL, "outcome": "success"}
        )
        return value or 0.0

    before = count()
    await served.client.embeddings.create(model=MODEL, input="count me")
    assert count() == before + 1
