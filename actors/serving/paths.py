"""Model paths: loads by path are allowed only inside the configured model directories."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from actors.errors import ModelNotFound, PathNotAllowed


def resolve_model_path(path: str, model_dirs: Sequence[Path]) -> Path:
    """Resolve `path` (symlinks and `..` included) and check it lies inside one of `model_dirs`.

    Relative paths are taken relative to the first model directory.
    """
    if not path or "\x00" in path:
        raise PathNotAllowed("model path is empty or contains a NUL byte")
    if not model_dirs:
        raise PathNotAllowed("no model directories are configured")
    raw = Path(path)
    candidate = raw if raw.is_absolute() else model_dirs[0] / raw
    resolved = candidate.resolve()
    for root in model_dirs:
        if resolved.is_relative_to(root.resolve()):
            if not resolved.is_file():
                raise ModelNotFound(f"model file not found: {path}")
            return resolved
    allowed = ", ".join(str(d) for d in model_dirs)
    raise PathNotAllowed(f"model path {path} is outside the model directories ({allowed})")
