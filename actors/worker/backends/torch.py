"""The torch backend: TorchScript (`.pt`) and torch.export (`.pt2`) programs, tensors in and out.

Neither format runs arbitrary pickled Python: `torch.jit.load` reads a TorchScript archive (code
compiled to TorchScript, constants through a restricted unpickler) and `torch.export.load` reads
an ExportedProgram (a serialised graph plus weights loaded with `weights_only`). A plain
`torch.save` pickle of a module is refused, never unpickled. torch is an optional extra, imported
only when a torch model is loaded.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actors.types import TensorData
from actors.worker.backends import BackendError, BadRequest, Generation, Outcome, file_version
from actors.worker.protocol import LoadSpec

_TORCH_MISSING = (
    "the torch backend needs PyTorch, which is an optional extra: pip install 'moc-node[torch]'"
)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise BackendError(_TORCH_MISSING) from exc
    return torch


def to_torch(torch: Any, tensor: TensorData) -> Any:
    """Build a torch tensor from wire bytes (copied, so the tensor owns writable memory)."""
    dtype = getattr(torch, tensor.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise BadRequest("tensors", f"unsupported dtype {tensor.dtype!r}")
    if not tensor.data:
        return torch.empty(tensor.shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(tensor.data), dtype=dtype)
    try:
        return flat.reshape(tensor.shape)
    except RuntimeError as exc:
        raise BadRequest("tensors", f"data does not fit shape {list(tensor.shape)}") from exc


def from_torch(value: Any) -> TensorData:
    """Encode a torch tensor as raw little-endian bytes with its dtype and shape."""
    t = value.detach().to("cpu").contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    # bfloat16 has no numpy twin: move its bytes as int16, which has the same layout.
    raw = t.view(_import_torch().int16) if dtype == "bfloat16" else t
    return TensorData(dtype, tuple(int(d) for d in t.shape), raw.numpy().tobytes())


def _outputs(torch: Any, result: Any) -> tuple[TensorData, ...]:
    if isinstance(result, torch.Tensor):
        return (from_torch(result),)
    if isinstance(result, list | tuple) and all(isinstance(r, torch.Tensor) for r in result):
        return tuple(from_torch(r) for r in result)
    raise BadRequest("tensors", f"the program returned {type(result).__name__}, not tensors")


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a `code/` folder and a `constants.pkl`."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile:
        return False
    return any("/code/" in n or n.startswith("code/") for n in names)


def check_torch_file(path: str) -> None:
    """Raise BackendError unless `path` is an exported program or a TorchScript archive.

    Cheap (no torch import), so a wrong file fails fast; anything else, a pickle above all,
    is refused before torch ever sees it.
    """
    p = Path(path)
    if not p.is_file():
        raise BackendError(f"model file {path} does not exist or is not a file")
    if p.suffix == ".pt2":
        if not zipfile.is_zipfile(p):
            raise BackendError(f"{path} is not an exported program archive (.pt2 is a zip file)")
        return
    if not _is_torchscript(p):
        raise BackendError(
            f"{path} is neither a TorchScript archive (.pt) nor an exported "
            "program (.pt2); pickled modules are refused"
        )


class TorchModel:
    """A TorchScript or torch.export program loaded on one device."""

    def __init__(self, fn: Callable[..., Any], torch: Any, device: str, version: str) -> None:
        self._fn = fn
        self._torch = torch
        self._device = device
        self._version = version

    @classmethod
    def load(cls, spec: LoadSpec) -> TorchModel:
        """Load a `.pt` TorchScript or `.pt2` exported program; raise BackendError on failure."""
        check_torch_file(spec.path)
        path = Path(spec.path)
        torch = _import_torch()
        device = f"cuda:{spec.device_index or 0}" if spec.on_gpu else "cpu"
        if spec.n_threads > 0:
            torch.set_num_threads(spec.n_threads)
        torch.manual_seed(spec.seed)
        try:
            if path.suffix == ".pt2":
                module = torch.export.load(str(path)).module()
                fn: Callable[..., Any] = module.to(device) if spec.on_gpu else module
            else:
                scripted = torch.jit.load(str(path), map_location=device)
                scripted.eval()
                fn = scripted
        except Exception as exc:
            raise BackendError(f"torch could not load {spec.path}: {exc}") from exc
        return cls(fn, torch, device, file_version(spec.path, path.stem))

    @property
    def version(self) -> str:
        """Identify the program."""
        return self._version

    @property
    def n_ctx(self) -> int:
        """Tensor programs have no context window."""
        return 0

    def set_threads(self, n_threads: int) -> None:
        """Run the next requests with `n_threads` intra-op threads."""
        self._torch.set_num_threads(n_threads)

    def close(self) -> None:
        """Drop the program (its memory goes with the process)."""
        self._fn = _closed

    def run(
        self, gen: Generation, emit: Callable[[str], None], should_stop: Callable[[], bool]
    ) -> Outcome:
        """Call the program on the request's tensors and return its output tensors."""
        if gen.tensors is None:
            raise BadRequest("tensors", "a torch model takes tensors, not text")
        torch = self._torch
        inputs = [to_torch(torch, t).to(self._device) for t in gen.tensors]
        if gen.params.seed is not None:
            torch.manual_seed(gen.params.seed)
        try:
            with torch.inference_mode():
                result = self._fn(*inputs)
        except BadRequest:
            raise
        except Exception as exc:  # shape and dtype mismatches surface as RuntimeError
            raise BadRequest("tensors", f"the program rejected its inputs: {exc}") from exc
        return Outcome("", 0, 0, "stop", _outputs(torch, result))


def _closed(*_args: Any) -> Any:
    raise RuntimeError("model is closed")
