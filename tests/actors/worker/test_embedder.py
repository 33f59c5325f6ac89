"""Embeddings from a second llama.cpp context on a loaded model's weights (real llama.cpp)."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.gguf_synth import N_VOCAB
from actors.worker.backends import BadRequest
from actors.worker.backends.embedder import MAX_SEQUENCES, Embedder, _groups, pooling_of

N_CTX = 128
N_EMBD = 64  # the tiny preset's


@pytest.fixture(scope="module")
def lib() -> Any:
    import llama_cpp

    llama_cpp.llama_cpp.llama_backend_init()
    return llama_cpp.llama_cpp


@pytest.fixture(scope="module")
def embedder(lib: Any, tiny_gguf: Path) -> Iterator[Embedder]:
    params = lib.llama_model_default_params()
    params.n_gpu_layers = 0
    model = lib.llama_model_load_from_file(str(tiny_gguf).encode(), params)
    assert model
    made = Embedder(lib, model, N_CTX, 1)
    yield made
    made.close()
    lib.llama_model_free(model)


def floats(vector: bytes) -> tuple[float, ...]:
    return struct.unpack(f"<{len(vector) // 4}f", vector)


def test_a_vector_has_the_models_width_and_unit_length(embedder: Embedder) -> None:
    (vector,) = embedder.embed([embedder.tokenize("hello world")])
    assert embedder.n_embd == N_EMBD
    values = floats(vector)
    assert len(values) == N_EMBD
    assert math.isclose(math.fsum(v * v for v in values), 1.0, rel_tol=1e-5)


def test_equal_texts_give_equal_vectors_and_different_texts_different_ones(
    embedder: Embedder,
) -> None:
    first = floats(embedder.embed([embedder.tokenize("the cat sat")])[0])
    again = floats(embedder.embed([embedder.tokenize("the cat sat")])[0])
    other = floats(embedder.embed([embedder.tokenize("a dog ran off")])[0])
    assert first == again
    assert max(abs(a - b) for a, b in zip(first, other, strict=True)) > 0.01


def test_inputs_decoded_together_equal_each_decoded_alone(embedder: Embedder) -> None:
    texts = ["one", "two words", "three words here", "x" * 60, "one"]
    together = embedder.embed([embedder.tokenize(t) for t in texts])
    for text, vector in zip(texts, together, strict=True):
        alone = floats(embedder.embed([embedder.tokenize(text)])[0])
        # Same sequence, other batch neighbours: llama.cpp's sums round apart by ~1e-5.
        assert max(abs(a - b) for a, b in zip(floats(vector), alone, strict=True)) < 1e-3


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ([[]], "input"),
        ([[1, 2], []], "input[1]"),
        ([[1] * (N_CTX + 1)], "input"),
        ([[1, N_VOCAB]], "input"),
    ],
    ids=["empty", "an empty second input", "longer than the context", "outside the vocabulary"],
)
def test_an_input_that_cannot_be_embedded_is_refused_naming_it(
    embedder: Embedder, inputs: list[list[int]], field: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        embedder.embed(inputs)
    assert caught.value.field == field


def test_tokenize_puts_the_bos_first(embedder: Embedder) -> None:
    tokens = embedder.tokenize("hi")
    assert tokens[0] == 1 and len(tokens) >= 3


@pytest.mark.parametrize(
    ("lengths", "groups"),
    [
        ([10, 10, 10], [[0, 1, 2]]),
        ([100, 30, 10], [[0], [1, 2]]),
        ([128, 1], [[0], [1]]),
        ([1] * (MAX_SEQUENCES + 1), [list(range(MAX_SEQUENCES)), [MAX_SEQUENCES]]),
    ],
    ids=["all fit", "a long first", "a full first", "past the sequence count"],
)
def test_inputs_are_grouped_in_order_within_the_context_and_the_sequences(
    lengths: list[int], groups: list[list[int]]
) -> None:
    assert _groups(lengths, N_CTX, MAX_SEQUENCES) == groups


@pytest.mark.parametrize(
    ("declared", "pooling"),
    [(None, 1), ("0", 1), ("1", 1), ("2", 2), ("3", 3), ("4", 1), ("junk", 1)],
    ids=["none declared", "none", "mean", "cls", "last", "rank", "garbage"],
)
def test_pooling_is_the_models_own_or_mean(declared: str | None, pooling: int) -> None:
    assert pooling_of(declared) == pooling
