"""Fixtures for learning tests: torch on one thread, a small text corpus, dataset dirs.

One torch thread: the machine runs several suites at once, and oversubscribed threads make
tiny models 50x slower; one thread also fixes the summation order for exact comparisons.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

CORPUS = [
    f"The {a} {v} on the {n}. The {n} was {c}."
    for a in ("cat", "dog", "bird", "fox")
    for v in ("sat", "slept", "stood")
    for n, c in (("mat", "red"), ("log", "brown"), ("rug", "blue"))
]


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread during each test, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    """Write `records` one JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    """Return a dataset directory holding text.jsonl (the corpus, one sentence a line)."""
    d = tmp_path / "datasets"
    write_jsonl(d / "text.jsonl", [{"text": s} for s in CORPUS])
    return d
