"""What a load becomes: the catalog entry a model is loaded with, its memory need, its worker.

A client's load request, a peer's, a restore and a catalog name all end as one `CatalogEntry`:
the request's fields over the catalog's (`base`), the path resolved inside the model
directories, the context fitted to what the model was trained for. Only headers and file sizes
are read here; the manager decides with what these return.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from actors.errors import InvalidRequest, ModelFileInvalid, ModelNotFound
from actors.serving.config import CatalogEntry
from actors.serving.context import fit_gguf_n_ctx
from actors.serving.estimate import CUDA_CONTEXT_MB, estimate_gguf_memory
from actors.serving.paths import resolve_model_path
from actors.types import DEFAULT_N_CTX, Backend, DeviceKind, LoadRequest
from actors.worker.handle import WorkerSpec
from actors.worker.protocol import LoadSpec

log = logging.getLogger(__name__)

MIB = 1024 * 1024
TORCH_ALLOCATOR_FACTOR = 1.2
"""A torch program's tensors live in its file; torch's allocator adds about a fifth."""
TORCH_HOST_MB = 64.0
"""What a torch worker holds on the host beside its tensors, off a GPU."""


def entry_for(
    request: LoadRequest, base: CatalogEntry | None, model_dirs: Sequence[Path]
) -> CatalogEntry:
    """Return the entry to load `request` with: its fields over the catalog's `base`."""
    if request.path is None and base is None:
        raise ModelNotFound(f"model {request.name!r} is not loaded and not in the catalog")
    path = request.path or (base.path if base else "")
    try:
        resolved = resolve_model_path(path, model_dirs)
    except OSError as exc:  # e.g. ENAMETOOLONG: the path is the client's, not the node's
        raise InvalidRequest("model_path", f"cannot be resolved: {exc.strerror}") from None
    backend = request.backend or (base.backend if base else backend_for(resolved))
    try:
        entry = CatalogEntry(
            name=request.name,
            path=str(resolved),
            backend=backend,
            n_ctx=request.n_ctx or (base.n_ctx if base else DEFAULT_N_CTX),
            gpu_layers=request.gpu_layers
            if request.gpu_layers is not None
            else (base.gpu_layers if base else -1),
            pin=request.pin if request.pin is not None else (base.pin if base else False),
            preload=base.preload if base is not None else False,
            # The catalog's adapter was made for the catalog's file: another file loads bare.
            lora=base.lora if base is not None and _same_file(resolved, base.path) else "",
            cpu_repack=base.cpu_repack if base is not None else None,
            n_ctx_max=base.n_ctx_max if base is not None else 0,
            parallel=base.parallel if base is not None else 0,  # the catalog's, never a client's
            threads=base.threads if base is not None else 0,  # the catalog's, never a client's
        )
    except ValueError as exc:
        field_name, _, message = str(exc).partition(": ")
        raise InvalidRequest(field_name, message) from None
    return fit_context(entry, asked=request.n_ctx is not None)


def _same_file(resolved: Path, catalog_path: str) -> bool:
    """Whether a request's resolved path is the catalog entry's own file."""
    try:
        return resolved == Path(catalog_path).resolve()
    except OSError:
        return False


def fit_context(entry: CatalogEntry, *, asked: bool) -> CatalogEntry:
    """Cap n_ctx at the model's trained context: a client asking for more is refused."""
    if entry.backend != "gguf":
        return entry
    n_ctx = fit_gguf_n_ctx(entry.path, entry.n_ctx, entry.n_ctx_max, asked=asked)
    if n_ctx == entry.n_ctx:
        return entry
    log.info(
        "loading %s with n_ctx %d instead of its catalog's %d: past what the model was "
        "trained for (or its n_ctx_max)",
        entry.name,
        n_ctx,
        entry.n_ctx,
    )
    return replace(entry, n_ctx=n_ctx)


GGUF_MAGIC = b"GGUF"
ZIP_MAGIC = b"PK\x03\x04"  # TorchScript and torch.export archives are both zips


def backend_for(path: Path) -> Backend:
    """Tell the backend from the file's first bytes, whatever its name; a file of neither
    format is ModelFileInvalid (the worker checks the archive's kind further)."""
    if not path.is_file():  # a FIFO would block the manager on open, a directory fail it
        raise ModelFileInvalid(f"{path.name} is not a regular file")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise InvalidRequest("model_path", f"cannot read {path.name}: {exc.strerror}") from None
    if magic == GGUF_MAGIC:
        return "gguf"
    if magic == ZIP_MAGIC:
        return "torch"
    raise ModelFileInvalid(
        f"{path.name} is neither a GGUF file nor a torch archive (TorchScript or torch.export)"
    )


def slots_of(entry: CatalogEntry, node_parallel: int | None = None) -> int:
    """Return the requests `entry` serves at once: its `parallel`, else the node's, else 1.

    Only a GGUF model batches (with or without a LoRA adapter); a torch model serves one
    request at a time.
    """
    if entry.backend != "gguf":
        return 1
    return entry.parallel or node_parallel or 1


def need_mb(entry: CatalogEntry, *, on_gpu: bool, node_parallel: int | None = None) -> float:
    """Estimate the MiB `entry` will claim once loaded, on a GPU or on the host.

    A model with slots holds the KV cache of every slot (`slots_of`).
    """
    if entry.backend == "torch":
        try:
            tensors = Path(entry.path).stat().st_size / MIB * TORCH_ALLOCATOR_FACTOR
        except OSError as exc:
            raise ModelFileInvalid(f"cannot read {entry.path}: {exc.strerror}") from None
        return tensors + (CUDA_CONTEXT_MB if on_gpu else TORCH_HOST_MB)
    estimate = estimate_gguf_memory(
        entry.path,
        n_ctx=entry.n_ctx,
        gpu_layers=entry.gpu_layers,
        on_gpu=on_gpu,
        parallel=slots_of(entry, node_parallel),
    )
    return float(estimate.total_mb)


def worker_spec(
    entry: CatalogEntry,
    *,
    device_kind: DeviceKind,
    device_index: int | None,
    cpu_repack: bool,
    node_parallel: int | None = None,
    n_threads: int = 0,
    nice: int = 0,
    huge_pages: bool = False,
) -> WorkerSpec:
    """Return what the worker process for `entry` is started with on its device.

    `node_parallel` is `[models] parallel`, for an entry that leaves it to the node;
    `n_threads` its share of the CPU (0: the entry's own setting, else the physical cores);
    `nice` how much lower than the node the worker runs; `huge_pages` whether it asks for
    transparent huge pages (`[resources] huge_pages`).
    """
    load = LoadSpec(
        backend=entry.backend,
        path=entry.path,
        n_ctx=entry.n_ctx,
        gpu_layers=entry.gpu_layers if device_kind == "nvml" else 0,
        device_kind=device_kind,
        device_index=device_index,
        lora_path=entry.lora or None,
        cpu_repack=cpu_repack,
        parallel=slots_of(entry, node_parallel),
        n_threads=n_threads or entry.threads,
        nice=nice,
    )
    return WorkerSpec(name=entry.name, load=load, huge_pages=huge_pages)


__all__ = ["backend_for", "entry_for", "fit_context", "need_mb", "slots_of", "worker_spec"]
