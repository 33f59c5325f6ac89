"""The GGUF memory estimate: header parsing, weight placement, and agreement with real loads."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.errors import ModelFileInvalid
from actors.gguf_synth import N_VOCAB, SIZES, write_preset
from actors.serving.config import CatalogEntry
from actors.serving.entry import need_mb
from actors.serving.estimate import (
    CUDA_CONTEXT_MB,
    GgufFormatError,
    GgufHeader,
    estimate_gguf_memory,
    read_gguf_header,
    split_weights,
)
from actors.types import GenerationParams, InferRequest, InferResult
from tests.actors.worker.workers import run_request, worker_for
from transports.errors import classify

MIB = 1024 * 1024


def test_the_header_gives_shapes_and_tensor_sizes_without_reading_the_data(tiny_gguf: Path) -> None:
    header = read_gguf_header(tiny_gguf)
    shape = SIZES["tiny"]
    assert header.metadata["general.architecture"] == "llama"
    assert header.metadata["llama.block_count"] == shape.n_layer
    assert header.array_lengths["tokenizer.ggml.tokens"] == N_VOCAB
    assert header.tensors["token_embd.weight"] == N_VOCAB * shape.n_embd * 4
    assert header.tensors["blk.0.attn_k.weight"] == shape.n_embd * (shape.n_embd // 2) * 4


def test_quantised_tensor_sizes_follow_the_block_layout(tmp_path: Path) -> None:
    path = write_preset(tmp_path / "q.gguf", "tiny", dtype="q8_0")
    header = read_gguf_header(path)
    # q8_0: blocks of 32 weights in 34 bytes; norms stay f32.
    assert header.tensors["blk.0.attn_q.weight"] == 64 * 64 // 32 * 34
    assert header.tensors["blk.0.attn_norm.weight"] == 64 * 4


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"GGML" + b"\x00" * 40, "not a GGUF file"), (b"GGUF\x03\x00\x00\x00\x01", "truncated")],
    ids=["wrong-magic", "truncated"],
)
def test_a_broken_file_raises_a_format_error(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(GgufFormatError, match=reason):
        estimate_gguf_memory(path, n_ctx=512)


def _header(n_layer: int) -> GgufHeader:
    tensors = {"token_embd.weight": 1000, "output_norm.weight": 1, "output.weight": 100}
    tensors.update({f"blk.{i}.attn_q.weight": 10 for i in range(n_layer)})
    return GgufHeader({}, {}, tensors)


@pytest.mark.parametrize(
    ("gpu_layers", "device", "host"),
    [
        (0, 0, 1000 + 1 + 100 + 40),
        (2, 20, 1000 + 1 + 100 + 20),
        (4, 40, 1000 + 1 + 100),
        (5, 40 + 101, 1000),
        (-1, 40 + 101, 1000),
        (99, 40 + 101, 1000),
    ],
    ids=[
        "none",
        "half-the-layers",
        "all-layers-not-the-head",
        "layers-and-head",
        "all",
        "more-than-all",
    ],
)
def test_offloading_places_layers_then_the_head_and_never_the_embeddings(
    gpu_layers: int, device: int, host: int
) -> None:
    assert split_weights(_header(4), 4, gpu_layers) == (device, host)


def test_a_gpu_estimate_counts_only_what_goes_to_the_device(small_gguf: Path) -> None:
    cpu = estimate_gguf_memory(small_gguf, n_ctx=1024)
    gpu_all = estimate_gguf_memory(small_gguf, n_ctx=1024, gpu_layers=-1, on_gpu=True)
    gpu_half = estimate_gguf_memory(small_gguf, n_ctx=1024, gpu_layers=2, on_gpu=True)
    embd = read_gguf_header(small_gguf).tensors["token_embd.weight"] / MIB
    assert gpu_all.weights_mb == pytest.approx(cpu.weights_mb - embd)
    assert gpu_half.kv_mb == pytest.approx(cpu.kv_mb / 2)
    assert gpu_half.weights_mb < gpu_all.weights_mb
    # On the device, besides the buffers, only the worker's CUDA context.
    assert gpu_all.overhead_mb == CUDA_CONTEXT_MB


def test_the_kv_cache_grows_linearly_with_the_context(small_gguf: Path) -> None:
    a = estimate_gguf_memory(small_gguf, n_ctx=512)
    b = estimate_gguf_memory(small_gguf, n_ctx=2048)
    shape = SIZES["small"]
    n_embd_kv = shape.n_embd // shape.n_head * shape.n_head_kv
    assert a.kv_mb == 2 * shape.n_layer * 512 * n_embd_kv * 2 / MIB
    assert b.kv_mb == 4 * a.kv_mb
    assert b.total_mb > a.total_mb


@pytest.fixture(scope="module")
def medium_gguf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = write_preset(tmp_path_factory.mktemp("medium") / "medium50m.gguf", "medium50m", seed=3)
    yield path
    path.unlink()


N_CTX = 512
RSS_JITTER_MB = 1.0  # run-to-run spread of a worker's RSS growth, seen on the tiny model
HUGE_PAGE_MB = 2.0  # a worker that asks for huge pages grows its heap a 2 MiB page at a time


@pytest.mark.parametrize("size", ["tiny", "small", "medium50m"])
def test_the_estimate_is_within_ten_percent_of_the_measured_working_size(
    size: str, request: pytest.FixtureRequest, runtime_dir: Path
) -> None:
    """Load through a real worker, fill the context with one prompt, compare the RSS growth.

    The working size is measured after a prompt that fills the context, because llama.cpp's
    compute buffer becomes resident only when a long prompt uses it.
    """
    path: Path = request.getfixturevalue(
        {"tiny": "tiny_gguf", "small": "small_gguf"}.get(size, "medium_gguf")
    )
    estimate = estimate_gguf_memory(path, n_ctx=N_CTX)
    worker = worker_for(path, runtime_dir, size, n_ctx=N_CTX, huge_pages=True)  # the default
    loaded = worker.start(timeout=120)
    try:
        prompt = "ab" * (N_CTX // 2 - 8)  # one token a byte: fills all but a few cells
        result = run_request(
            worker,
            InferRequest(
                model=size, prompt=prompt, params=GenerationParams(max_tokens=4, temperature=0.0)
            ),
        )
    finally:
        worker.stop()
    assert result.prompt_tokens + 4 > N_CTX - 16
    measured = worker.peak_memory_mb
    assert measured is not None and measured >= loaded.measured_mb
    error = abs(estimate.total_mb - measured) / measured
    # Within 10%, or within RSS's own jitter: the same tiny worker measured 5.37 MiB in one run
    # and 6.89-7.01 MiB in eight others (estimate 6.27), whatever the model; asking for huge
    # pages, 7.0 or 8.9-9.0 MiB, as the kernel gives the heap's top a huge page or not (a
    # huge page only ever adds).
    over = measured - estimate.total_mb
    assert error <= 0.10 or -RSS_JITTER_MB <= over <= RSS_JITTER_MB + HUGE_PAGE_MB, (
        f"{size}: estimate {estimate} vs measured {measured:.2f} MiB ({error:.1%})"
    )


@pytest.mark.parametrize("size", ["small", "medium50m"])
def test_with_four_slots_the_estimate_counts_every_slots_kv_and_is_within_ten_percent(
    size: str, request: pytest.FixtureRequest, runtime_dir: Path
) -> None:
    """Four prompts fill the four slots of a batching worker at once; compare its peak RSS."""
    path: Path = request.getfixturevalue({"small": "small_gguf"}.get(size, "medium_gguf"))
    entry = CatalogEntry(name=size, path=str(path), n_ctx=N_CTX, parallel=4)
    need = need_mb(entry, on_gpu=False)
    kv_one = estimate_gguf_memory(path, n_ctx=N_CTX).kv_mb
    assert estimate_gguf_memory(path, n_ctx=N_CTX, parallel=4).kv_mb == 4 * kv_one
    worker = worker_for(path, runtime_dir, size, n_ctx=N_CTX, parallel=4, huge_pages=True)
    worker.start(timeout=120)
    prompts = [chr(ord("a") + i) + "b" * (N_CTX - 20) for i in range(4)]  # distinct: no reuse

    async def fill() -> list[InferResult]:
        async def one(prompt: str) -> InferResult:
            channel = worker.open_channel()
            try:
                req = InferRequest(model=size, prompt=prompt, params=GenerationParams(4, 0.0))
                return await channel.infer(req)
            finally:
                channel.close()

        return await asyncio.gather(*(one(p) for p in prompts))

    try:
        results = asyncio.run(fill())
    finally:
        worker.stop()
    assert all(r.prompt_tokens > N_CTX - 24 for r in results)
    measured = worker.peak_memory_mb
    assert measured is not None
    error = abs(need - measured) / measured
    assert error <= 0.10, (
        f"{size}: estimate {need:.2f} vs measured {measured:.2f} MiB ({error:.1%})"
    )


# ---- headers a client may craft: each fails as a GgufFormatError (a 400), never another error --


def _gguf_bytes(n_tensors: int, kvs: list[bytes], tail: bytes = b"") -> bytes:
    """Raw GGUF v3 bytes: magic, version, counts, the given key/value records, then `tail`."""
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs))
    return head + b"".join(kvs) + tail


def _key(name: str) -> bytes:
    raw = name.encode()
    return struct.pack("<Q", len(raw)) + raw


def _nested_arrays(depth: int) -> bytes:
    """A value of `depth` arrays each holding one array, the innermost holding nothing."""
    return struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 4, 0)


def _llama_header(path: Path, **overrides: int) -> Path:
    """A header-only llama GGUF (no tensors) with the given sizes overriding small defaults."""
    import gguf

    sizes = {
        "block_count": 1,
        "embedding_length": 64,
        "attention.head_count": 4,
        "feed_forward_length": 128,
    }
    sizes.update(overrides)
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in sizes.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_uint32("llama.vocab_size", 256)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


CRAFTED: list[tuple[str, bytes, str]] = [
    ("empty file", b"", "not a GGUF file"),
    ("three bytes", b"GGU", "not a GGUF file"),
    ("a text file", b"hello, I am not a model\n", "not a GGUF file"),
    (
        "an array claiming 2^63 items",
        _gguf_bytes(0, [_key("x") + struct.pack("<IIQ", 9, 4, 1 << 63)]),
        "implausible array length",
    ),
    (
        "an array of strings claiming 2^63 items",
        _gguf_bytes(0, [_key("x") + struct.pack("<IIQ", 9, 8, 1 << 63)]),
        "implausible array length",
    ),
    ("2^63 metadata records", b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 63), "implausible"),
    ("2^63 tensors", b"GGUF" + struct.pack("<IQQ", 3, 1 << 63, 0), "implausible"),
    (
        "arrays nested 5,000 deep",
        _gguf_bytes(0, [_key("x") + _nested_arrays(5000)]),
        "nested deeper",
    ),
    (
        "a tensor with 2^32-1 dimensions",
        _gguf_bytes(1, [], _key("t") + struct.pack("<I", 2**32 - 1) + b"\x00" * 64),
        "dimensions",
    ),
    (
        "a string longer than the file",
        _gguf_bytes(0, [struct.pack("<Q", 1 << 40) + b"\x00" * 8]),
        "implausible string length",
    ),
]


@pytest.mark.parametrize(
    ("content", "reason"), [c[1:] for c in CRAFTED], ids=[c[0] for c in CRAFTED]
)
def test_a_crafted_header_fails_as_a_format_error_and_nothing_else(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "crafted.gguf"
    path.write_bytes(content)
    with pytest.raises(GgufFormatError, match=reason):
        estimate_gguf_memory(path, n_ctx=512)


@pytest.mark.parametrize("key", ["attention.head_count", "embedding_length", "block_count"])
def test_a_zero_size_in_the_metadata_is_a_format_error_not_a_division_by_zero(
    tmp_path: Path, key: str
) -> None:
    path = _llama_header(tmp_path / "zero.gguf", **{key: 0})
    with pytest.raises(GgufFormatError, match=f"llama.{key} is 0"):
        estimate_gguf_memory(path, n_ctx=512)


def test_a_missing_file_is_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(GgufFormatError, match="cannot read"):
        read_gguf_header(tmp_path / "nowhere.gguf")


def test_a_format_error_is_a_client_error_that_the_fronts_answer_with_400() -> None:
    assert issubclass(GgufFormatError, ModelFileInvalid)
    assert classify(GgufFormatError("x.gguf is not a GGUF file")).status == 400
