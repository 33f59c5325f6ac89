"""A load's n_ctx is capped at the model's trained context unless its catalog entry allows more."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.errors import InvalidRequest
from actors.gguf_synth import SIZES, write_llama_gguf
from actors.serving.context import fit_gguf_n_ctx, fit_n_ctx, trained_context
from actors.serving.estimate import read_gguf_header


@pytest.mark.parametrize(
    ("n_ctx", "trained", "n_ctx_max"),
    [(2048, 2048, 0), (256, 2_147_483_647, 0), (8192, 2048, 8192), (4096, None, 0),
     (4096, None, 4096)],
    ids=["the-trained-context", "under-a-huge-trained-context", "what-the-entry-allows",
         "a-model-that-does-not-say", "a-model-that-does-not-say-within-the-entry"],
)  # fmt: skip
def test_a_context_within_the_limit_is_loaded_as_asked(
    n_ctx: int, trained: int | None, n_ctx_max: int
) -> None:
    assert fit_n_ctx(n_ctx, trained, n_ctx_max, asked=True) == n_ctx
    assert fit_n_ctx(n_ctx, trained, n_ctx_max, asked=False) == n_ctx


@pytest.mark.parametrize(
    ("n_ctx", "trained", "n_ctx_max", "says"),
    [(1_048_576, 2048, 0, "trained for 2048 tokens"),
     (4096, 2048, 3000, "allows at most 3000 (n_ctx_max)"),
     (2048, 8192, 1024, "allows at most 1024 (n_ctx_max)"),
     (8192, None, 4096, "allows at most 4096")],
    ids=["past-the-trained-context", "past-what-the-entry-allows",
         "the-entry-may-also-allow-less", "a-model-that-does-not-say-past-the-entry"],
)  # fmt: skip
def test_a_longer_context_a_client_asks_for_is_refused_naming_n_ctx_and_the_limit(
    n_ctx: int, trained: int | None, n_ctx_max: int, says: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        fit_n_ctx(n_ctx, trained, n_ctx_max, asked=True)
    assert refused.value.field == "n_ctx"
    assert says in str(refused.value) and str(n_ctx) in str(refused.value)


@pytest.mark.parametrize(
    ("n_ctx", "trained", "n_ctx_max", "fitted"),
    [(2048, 512, 0, 512), (8192, 2048, 4096, 4096), (2048, 8192, 1024, 1024)],
    ids=["the-default-on-a-model-trained-for-less", "past-what-the-entry-allows",
         "the-entry-allows-less"],
)  # fmt: skip
def test_a_longer_context_from_the_catalog_is_capped_at_the_limit(
    n_ctx: int, trained: int | None, n_ctx_max: int, fitted: int
) -> None:
    assert fit_n_ctx(n_ctx, trained, n_ctx_max, asked=False) == fitted


def _model(path: Path, n_ctx_train: int) -> Path:
    s = SIZES["tiny"]
    return write_llama_gguf(path, n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head,
                            n_head_kv=s.n_head_kv, n_ff=s.n_ff, n_ctx_train=n_ctx_train)  # fmt: skip


def test_the_trained_context_is_read_from_the_gguf_header(tmp_path: Path) -> None:
    path = _model(tmp_path / "m.gguf", 2_147_483_647)
    assert trained_context(read_gguf_header(path)) == 2_147_483_647
    assert fit_gguf_n_ctx(str(path), 256, asked=True) == 256


def test_a_gguf_file_refuses_a_context_past_its_training(tmp_path: Path) -> None:
    path = _model(tmp_path / "m.gguf", 2048)
    assert fit_gguf_n_ctx(str(path), 2048, asked=True) == 2048
    with pytest.raises(InvalidRequest, match="n_ctx: 1048576 is too long"):
        fit_gguf_n_ctx(str(path), 1_048_576, asked=True)
    allowed = fit_gguf_n_ctx(str(path), 1_048_576, n_ctx_max=1_048_576, asked=True)
    assert allowed == 1_048_576  # the catalog allows it
