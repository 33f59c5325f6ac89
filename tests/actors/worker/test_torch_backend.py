"""The torch backend in a real worker: TorchScript and torch.export programs, tensors in and out."""

from __future__ import annotations

import pickle
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from actors.errors import InvalidRequest, ModelLoadFailed
from actors.types import InferRequest, TensorData
from actors.worker.client import WorkerProcess
from tests.actors.worker.workers import run_request, worker_for

# torch.jit is deprecated upstream but TorchScript files are what the legacy fleet ships.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Affine(torch.nn.Module):  # type: ignore[misc,name-defined]
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(4, 3, generator=g))
        self.bias = torch.nn.Parameter(torch.randn(3, generator=g))

    def forward(self, x: Any) -> Any:
        return torch.tanh(x @ self.weight + self.bias)


class TwoOutputs(torch.nn.Module):  # type: ignore[misc,name-defined]
    def forward(self, x: Any, n: Any) -> tuple[Any, Any]:
        return x * 2.0, n + 1


def tensor(t: Any) -> TensorData:
    return TensorData(
        str(t.dtype).removeprefix("torch."), tuple(t.shape), t.contiguous().numpy().tobytes()
    )


def to_numpy(t: TensorData) -> Any:
    return np.frombuffer(t.data, dtype=t.dtype).reshape(t.shape)


@pytest.fixture(scope="module")
def affine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, WorkerProcess]]:
    """A traced TorchScript module and one worker serving it, shared by this module's tests."""
    module = Affine().eval()
    path = tmp_path_factory.mktemp("torch") / "affine.pt"
    torch.jit.trace(module, torch.zeros(1, 4)).save(str(path))
    runtime = Path(tempfile.mkdtemp(prefix="moc-rt-"))
    w = worker_for(path, runtime, "affine", backend="torch", n_threads=1)
    w.start(timeout=120)
    yield module, w
    w.stop()
    shutil.rmtree(runtime, ignore_errors=True)


def test_a_torchscript_module_gives_the_same_tensor_as_torch_in_process(
    affine: tuple[Any, WorkerProcess],
) -> None:
    module, w = affine
    x = torch.arange(8, dtype=torch.float32).reshape(2, 4) / 7.0
    result = run_request(w, InferRequest(model="affine", tensors=(tensor(x),)))
    assert result.tensors is not None
    (out,) = result.tensors
    with torch.no_grad():
        expected = module(x).numpy()
    assert out.dtype == "float32" and out.shape == (2, 3)
    np.testing.assert_array_equal(to_numpy(out), expected)


def test_inputs_of_the_wrong_shape_are_an_invalid_request(
    affine: tuple[Any, WorkerProcess],
) -> None:
    _, w = affine
    with pytest.raises(InvalidRequest, match="rejected its inputs") as err:
        run_request(w, InferRequest(model="affine", tensors=(tensor(torch.zeros(2, 5)),)))
    assert err.value.field == "tensors"
    with pytest.raises(InvalidRequest, match="takes tensors, not text"):
        run_request(w, InferRequest(model="affine", prompt="hello"))
    assert w.alive


def test_an_exported_program_gives_the_same_tensors_as_torch_in_process(
    tmp_path: Path, runtime_dir: Path
) -> None:
    module = TwoOutputs().eval()
    x = torch.linspace(-1, 1, 6).reshape(3, 2)
    n = torch.tensor([1, 2, 3], dtype=torch.int64)
    path = tmp_path / "two.pt2"
    torch.export.save(torch.export.export(module, (x, n)), str(path))
    w = worker_for(path, runtime_dir, "two", backend="torch", n_threads=1)
    w.start(timeout=120)
    try:
        result = run_request(w, InferRequest(model="two", tensors=(tensor(x), tensor(n))))
    finally:
        w.stop()
    assert result.tensors is not None
    doubled, bumped = result.tensors
    np.testing.assert_array_equal(to_numpy(doubled), (x * 2.0).numpy())
    assert bumped.dtype == "int64"
    np.testing.assert_array_equal(to_numpy(bumped), np.array([2, 3, 4]))


def test_a_pickled_module_is_refused_not_unpickled(tmp_path: Path, runtime_dir: Path) -> None:
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"not": "a torchscript archive"}))
    w = worker_for(path, runtime_dir, "evil", backend="torch")
    with pytest.raises(ModelLoadFailed, match="pickled modules are refused"):
        w.start(timeout=120)
