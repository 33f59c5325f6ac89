"""llama.cpp's own tools, built from the source the installed llama-cpp-python vendors.

The honest anchor for serving speed is llama.cpp itself with its own defaults: `llama-server`
(parallel slots, continuous batching) and `llama-batched-bench` (the decode ceiling). They are
built once from the same llama.cpp (same ggml) that llama-cpp-python was built from, and cached
outside the repository:

    .venv/bin/python bench/llama_tools.py            # build (a few minutes on 2 cores), print paths
    .venv/bin/python bench/llama_tools.py --show     # print what is cached

The source is llama-cpp-python's own sdist (`pip download --no-binary :all:`), whose
`vendor/llama.cpp` is what the installed wheel was compiled from; the build is native (as
llama-cpp-python's default build is) and Release. The cache key is the llama-cpp-python version
and the CPU model, so a cache copied to another host is not trusted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TOOLS = ("llama-server", "llama-batched-bench")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
)
"""Release, native like llama-cpp-python's wheel; no curl (no model hub here)."""


def installed_version() -> str:
    """Return the installed llama-cpp-python's version (the source to build must match it)."""
    from importlib.metadata import version

    return version("llama-cpp-python")


def cpu_model() -> str:
    """Name this CPU, as the cache key's host part (a native build is only good on its CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir(version: str) -> Path:
    """Return where this version's tools live for this CPU."""
    root = Path(os.environ.get("MOC_TOOLS_CACHE", Path.home() / ".cache" / "moc-node"))
    key = hashlib.sha1(f"{cpu_model()}|{' '.join(CMAKE_FLAGS)}".encode()).hexdigest()[:10]
    return root / f"llama.cpp-{version}-{key}"


def cached(version: str) -> dict[str, Path] | None:
    """Return {tool: path} when every tool is built for this version and CPU, else None."""
    bin_dir = cache_dir(version) / "bin"
    paths = {tool: bin_dir / tool for tool in TOOLS}
    return paths if all(p.is_file() and os.access(p, os.X_OK) for p in paths.values()) else None


def build(version: str, jobs: int | None = None, log=sys.stderr) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """Build the tools for `version` (unless cached) and return {tool: path}."""
    done = cached(version)
    if done is not None:
        return done
    target = cache_dir(version)
    with tempfile.TemporaryDirectory(prefix="llama-tools-") as tmp:
        work = Path(tmp)
        print(f"llama_tools: fetching llama-cpp-python {version} source", file=log, flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
             f"llama-cpp-python=={version}", "-d", str(work)],
            check=True,
        )
        (sdist,) = work.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build_dir = work / "build"
        print(f"llama_tools: building {', '.join(TOOLS)} from {source}", file=log, flush=True)
        subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), *CMAKE_FLAGS],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(
            ["cmake", "--build", str(build_dir), "-j", str(jobs or os.cpu_count() or 1),
             "--target", *TOOLS],
            check=True, stdout=subprocess.DEVNULL,
        )
        (target / "bin").mkdir(parents=True, exist_ok=True)
        for tool in TOOLS:
            shutil.copy2(build_dir / "bin" / tool, target / "bin" / tool)
        # The tools link ggml and llama as shared libraries: keep them beside the binaries.
        for lib in build_dir.rglob("*.so*"):
            shutil.copy2(lib, target / "bin" / lib.name, follow_symlinks=True)
        server = target / "bin" / "llama-server"
        said = subprocess.run([str(server), "--version"], capture_output=True, text=True,
                              env=env_for(server), check=False)
        info = {"llama_cpp_python": version, "cpu": cpu_model(), "cmake_flags": list(CMAKE_FLAGS),
                "llama_server_version": (said.stdout + said.stderr).strip()}
        (target / "build.json").write_text(json.dumps(info, indent=2))
    paths = cached(version)
    if paths is None:
        raise RuntimeError(f"the build finished but {target / 'bin'} lacks {TOOLS}")
    return paths


def describe(version: str) -> dict[str, object]:
    """Return the build's record (version, CPU, flags), for benches to print."""
    path = cache_dir(version) / "build.json"
    return json.loads(path.read_text()) if path.exists() else {}


def env_for(tool: Path) -> dict[str, str]:
    """Return an environment in which `tool` finds its shared libraries."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{tool.parent}:{env.get('LD_LIBRARY_PATH', '')}"
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--show", action="store_true", help="print what is cached; build nothing")
    parser.add_argument("--jobs", type=int, help="parallel compile jobs (default: all CPUs)")
    args = parser.parse_args()
    version = installed_version()
    paths = cached(version) if args.show else build(version, args.jobs)
    if paths is None:
        print(f"not built yet for llama-cpp-python {version} on this CPU: {cache_dir(version)}")
        return 1
    print(json.dumps({"tools": {k: str(v) for k, v in paths.items()}, **describe(version)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
