"""What a load request becomes: the request's fields over the catalog's, checked and fitted."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from actors.errors import InvalidRequest, ModelFileInvalid, ModelNotFound, PathNotAllowed
from actors.serving.config import CatalogEntry
from actors.serving.entry import backend_for, entry_for, need_mb, worker_spec
from actors.types import LoadRequest


@pytest.mark.parametrize(
    ("name", "head", "expected"),
    [
        ("m.gguf", b"GGUF\x03\x00\x00\x00", "gguf"),
        ("m.bin", b"GGUF\x03\x00\x00\x00", "gguf"),
        ("m.pt", b"PK\x03\x04rest", "torch"),
        ("m.pt2", b"PK\x03\x04rest", "torch"),
    ],
    ids=["gguf", "gguf-under-any-name", "torchscript", "torch-export"],
)
def test_the_backend_follows_from_the_files_first_bytes(
    tmp_path: Path, name: str, head: bytes, expected: str
) -> None:
    path = tmp_path / name
    path.write_bytes(head)
    assert backend_for(path) == expected


@pytest.mark.parametrize(
    "head",
    [b"", b"GG", b"\x80\x04\x95pickle", b"PK\x05\x06"],
    ids=["empty", "short", "pickle", "empty-zip"],
)
def test_a_file_of_neither_format_is_refused_as_an_invalid_model_file(
    tmp_path: Path, head: bytes
) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(head)
    with pytest.raises(ModelFileInvalid, match="neither a GGUF file nor a torch archive"):
        backend_for(path)


def test_a_request_by_name_alone_takes_the_catalog_entry(tiny_gguf: Path) -> None:
    base = CatalogEntry("m", str(tiny_gguf), n_ctx=64, pin=True, lora="/a.gguf")
    entry = entry_for(LoadRequest(name="m"), base, [tiny_gguf.parent])
    assert (entry.path, entry.n_ctx, entry.pin, entry.lora) == (str(tiny_gguf), 64, True, "/a.gguf")


def test_every_field_of_the_catalog_entry_reaches_the_entry_loaded_by_name(
    tiny_gguf: Path,
) -> None:
    # Found by measuring: `threads` was dropped here, so a catalog's `threads = 1` decoded with
    # every core. Each field set to something other than its default must come through.
    base = CatalogEntry(
        "m",
        str(tiny_gguf),
        backend="gguf",
        n_ctx=64,
        n_ctx_max=128,
        gpu_layers=3,
        preload=True,
        pin=True,
        lora="/a.gguf",
        cpu_repack=True,
        parallel=4,
        threads=1,
    )
    entry = entry_for(LoadRequest(name="m"), base, [tiny_gguf.parent])
    differ = {
        f.name
        for f in dataclasses.fields(CatalogEntry)
        if getattr(entry, f.name) != getattr(base, f.name)
    }
    assert differ == set()
    spec = worker_spec(entry, device_kind="cpu", device_index=None, cpu_repack=False)
    assert spec.load.n_threads == 1


def test_a_request_naming_the_catalogs_own_file_keeps_its_adapter(tiny_gguf: Path) -> None:
    # A restart restores a model, and a reload after an unload reloads it, by name and path:
    # the catalog's adapter must come back with it (found by review: it was dropped).
    base = CatalogEntry("m", str(tiny_gguf), lora="/a.gguf")
    for path in (str(tiny_gguf), tiny_gguf.name):
        entry = entry_for(LoadRequest(name="m", path=path), base, [tiny_gguf.parent])
        assert entry.lora == "/a.gguf"


def test_the_requests_fields_win_over_the_catalogs(tiny_gguf: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.gguf"
    other.write_bytes(tiny_gguf.read_bytes())
    base = CatalogEntry("m", str(tiny_gguf), n_ctx=64, pin=True, lora="/a.gguf")
    request = LoadRequest(name="m", path=str(other), n_ctx=32, pin=False, gpu_layers=3)
    entry = entry_for(request, base, [tiny_gguf.parent, tmp_path])
    assert (entry.path, entry.n_ctx, entry.pin, entry.gpu_layers) == (str(other), 32, False, 3)
    assert entry.lora == ""  # another file: the catalog's adapter was made for its own


def test_a_name_neither_loaded_nor_in_the_catalog_needs_a_path() -> None:
    with pytest.raises(ModelNotFound, match="not in the catalog"):
        entry_for(LoadRequest(name="m"), None, [Path("/models")])


def test_a_path_outside_the_model_directories_is_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(PathNotAllowed):
        entry_for(LoadRequest(name="m", path=str(tiny_gguf)), None, [tmp_path])


def test_a_bad_field_is_refused_naming_it(tiny_gguf: Path) -> None:
    with pytest.raises(InvalidRequest) as refused:
        entry_for(LoadRequest(name="m", path=str(tiny_gguf), n_ctx=8), None, [tiny_gguf.parent])
    assert refused.value.field == "n_ctx"


def test_a_context_past_the_trained_one_is_refused_when_asked_and_capped_from_the_catalog(
    tiny_gguf: Path,
) -> None:
    dirs = [tiny_gguf.parent]
    with pytest.raises(InvalidRequest, match="n_ctx"):
        entry_for(LoadRequest(name="m", path=str(tiny_gguf), n_ctx=1_000_000), None, dirs)
    base = CatalogEntry("m", str(tiny_gguf), n_ctx=1_000_000)
    assert entry_for(LoadRequest(name="m"), base, dirs).n_ctx < 1_000_000


def test_a_torch_program_needs_its_file_size_and_a_fifth_more(tmp_path: Path) -> None:
    program = tmp_path / "m.pt"
    program.write_bytes(b"\0" * (10 * 1024 * 1024))
    entry = CatalogEntry("m", str(program), backend="torch")
    assert need_mb(entry, on_gpu=False) == pytest.approx(10 * 1.2 + 64)


def test_gpu_layers_reach_the_worker_only_on_a_gpu(tiny_gguf: Path) -> None:
    entry = CatalogEntry("m", str(tiny_gguf), gpu_layers=-1)
    on_cpu = worker_spec(entry, device_kind="cpu", device_index=None, cpu_repack=False)
    on_gpu = worker_spec(entry, device_kind="nvml", device_index=1, cpu_repack=False)
    assert (on_cpu.load.gpu_layers, on_gpu.load.gpu_layers) == (0, -1)
    assert (on_gpu.name, on_gpu.load.device_index) == ("m", 1)


def test_a_fifo_or_a_directory_is_refused_without_being_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "m.gguf"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    directory = tmp_path / "d.gguf"
    directory.mkdir()
    for path in (fifo, directory):
        with pytest.raises(ModelFileInvalid, match="not a regular file"):
            backend_for(path)
