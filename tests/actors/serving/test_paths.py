from __future__ import annotations

from pathlib import Path

import pytest

from actors.errors import ModelNotFound, PathNotAllowed
from actors.serving.paths import resolve_model_path


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    models = tmp_path / "models"
    outside = tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    (models / "ok.gguf").write_bytes(b"x")
    (outside / "secret.gguf").write_bytes(b"x")
    (models / "escape.gguf").symlink_to(outside / "secret.gguf")
    return models, outside


def test_a_file_inside_the_model_dir_resolves(layout: tuple[Path, Path]) -> None:
    models, _ = layout
    assert resolve_model_path(str(models / "ok.gguf"), [models]) == models / "ok.gguf"
    assert resolve_model_path("ok.gguf", [models]) == models / "ok.gguf"


@pytest.mark.parametrize(
    "path",
    ["../outside/secret.gguf", "escape.gguf", "/etc/passwd", "", "ok\x00.gguf"],
    ids=["dot-dot", "symlink-escape", "absolute-outside", "empty", "nul-byte"],
)
def test_a_path_outside_the_model_dirs_is_refused(layout: tuple[Path, Path], path: str) -> None:
    models, _ = layout
    with pytest.raises(PathNotAllowed):
        resolve_model_path(path, [models])


def test_a_missing_file_inside_the_dirs_is_not_found(layout: tuple[Path, Path]) -> None:
    models, _ = layout
    with pytest.raises(ModelNotFound):
        resolve_model_path("nope.gguf", [models])
