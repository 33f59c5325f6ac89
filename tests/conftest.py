"""Shared fixtures: synthetic GGUF models generated once per session, short runtime dirs.

The models are real llama-architecture GGUF files (see actors/gguf_synth.py) that llama.cpp
loads; `model_dir` holds them. Treat `model_dir` as read-only: copy a model into `tmp_path`
before changing it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.gguf_synth import write_preset


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a session directory holding the generated models (tiny.gguf, small.gguf)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_gguf(model_dir: Path) -> Path:
    """Return a ~0.1M-parameter f32 llama GGUF with a byte vocabulary and a chat template."""
    return write_preset(model_dir / "tiny.gguf", "tiny", seed=1)


@pytest.fixture(scope="session")
def small_gguf(model_dir: Path) -> Path:
    """Return a ~2.4M-parameter f32 llama GGUF with a byte vocabulary and a chat template."""
    return write_preset(model_dir / "small.gguf", "small", seed=2)


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """Return a short private directory for ipc sockets (sun_path holds only 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="moc-rt-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
