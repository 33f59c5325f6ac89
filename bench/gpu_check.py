"""Check, on a machine with an NVIDIA GPU, what only a GPU can show.

The test suite runs where there is no GPU, so the NVML paths are proven here instead:

- nvml:  the node's NVML probe reads what `nvidia-smi` reads; memory another process takes shows
         up in the probe, and per-process readings match `nvidia-smi --query-compute-apps`.
- torch: a TorchScript program runs on CUDA through the torch backend and agrees with the CPU.
- node:  a real `moc-node run` with `devices = "auto"` puts its ledger on `cuda:0`, sees an outside
         allocation, places a torch model on the GPU and measures it as nvidia-smi does, and gives
         the memory back on unload.
- gguf:  (needs llama-cpp-python built with CUDA) the same node offloads a GGUF model's layers,
         measures it against its estimate, and decodes greedily as the CPU does.

Prints one table per check and, with --json, one JSON object of the figures as the last line.
On a machine without NVML it says so and exits 0 having checked nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

# The repository root, so `actors` imports without an installed package.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The node under test is started and stopped as the HTTP load bench does it.
from http_load import free_port, stop, wait_http  # noqa: E402

from actors.serving.config import ResourcesConfig  # noqa: E402
from actors.serving.probes import NvmlProbe, discover  # noqa: E402

T = TypeVar("T")
DEVICES = (("cuda", True), ("cpu", False))
CHECKS = ("nvml", "torch", "node", "gguf")
HOLD_MIB = 8192  # what the outside process takes; large enough to stand out of any noise
ALLOCATE = """
import sys, torch
x = torch.empty({mib} * 1024 * 1024, dtype=torch.uint8, device="cuda")
x.fill_(1)
torch.cuda.synchronize()
print("ready", flush=True)
sys.stdin.read()
"""


def smi(query: str, kind: str = "gpu") -> list[list[str]]:
    """Run one nvidia-smi query; return its CSV rows."""
    out = subprocess.run(
        ["nvidia-smi", f"--query-{kind}={query}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [[cell.strip() for cell in line.split(",")] for line in out.strip().splitlines()]


def smi_used_mib(index: int = 0) -> float:
    return float(smi("memory.used")[index][0])


def smi_process_mib(pid: int) -> float | None:
    for row in smi("pid,used_memory", "compute-apps"):
        if row and row[0] == str(pid):
            return float(row[1])
    return None


def settle(read: Callable[[], T], ok: Callable[[T], bool], timeout: float) -> tuple[T, bool]:
    """Poll `read` until `ok` holds for its value; return the last value and whether it held."""
    deadline = time.monotonic() + timeout
    value = read()
    while not ok(value) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling a condition with a deadline
        value = read()
    return value, ok(value)


class OutsideAllocation:
    """A separate process holding `mib` MiB of GPU memory until closed."""

    def __init__(self, mib: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ALLOCATE.format(mib=mib)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the allocating process failed")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def row(label: str, *cells: object) -> None:
    print(f"  {label:<44}" + "".join(f"{c!s:>16}" for c in cells))


def check_nvml(figures: dict[str, Any]) -> NvmlProbe:
    print("\n== nvml: the node's probe against nvidia-smi")
    probes = discover(ResourcesConfig())
    kinds = [p.kind for p in probes]
    row("devices found by discover()", ", ".join(f"{p.name} ({p.kind})" for p in probes))
    probe = probes[0]
    if not isinstance(probe, NvmlProbe):
        raise SystemExit(f"discover() found no NVML GPU: {kinds}")
    total, used, driver = smi("memory.total,memory.used,driver_version")[0]
    reading = probe.read()
    row("", "probe", "nvidia-smi", "difference")
    row("model", probe.model, smi("name")[0][0], "")
    row("total MiB", f"{reading.total_mb:.0f}", total, f"{reading.total_mb - float(total):+.0f}")
    row("used MiB", f"{reading.used_mb:.0f}", used, f"{reading.used_mb - float(used):+.0f}")
    row("utilisation %, temperature C", reading.utilization_percent, reading.temperature_c, "")
    row("driver", driver, "", "")
    with contextlib.suppress(Exception):  # the v2 struct needs a recent driver and nvidia-ml-py
        nvml = probe._nvml
        v2 = nvml.nvmlDeviceGetMemoryInfo(probe._handle, version=nvml.nvmlMemory_v2)
        row("NVML v2 used / reserved MiB", f"{v2.used / 2**20:.0f}", f"{v2.reserved / 2**20:.0f}")
        figures["nvml_v2_reserved_mib"] = round(v2.reserved / 2**20)
    before = probe.read().used_mb
    hold = OutsideAllocation(HOLD_MIB)
    try:
        during = probe.read().used_mb
        own = probe.process_memory_mb(hold.proc.pid)
        smi_own = smi_process_mib(hold.proc.pid)
    finally:
        hold.close()
    after, released = settle(lambda: probe.read().used_mb, lambda u: u < before + 64, 15)
    row(f"outside process takes {HOLD_MIB} MiB: used rises by", f"{during - before:.0f}")
    row("  that process as the probe reads it, MiB", own, smi_own, "(nvidia-smi)")
    row("  used after it exits, MiB", f"{after:.0f}", f"(before {before:.0f})")
    figures["nvml"] = {
        "model": probe.model,
        "driver": driver,
        "total_mib": round(reading.total_mb),
        "total_diff_mib": round(reading.total_mb - float(total)),
        "used_diff_mib": round(reading.used_mb - float(used)),
        "outside_rise_mib": round(during - before),
        "outside_process_mib": own,
        "outside_process_smi_mib": smi_own,
        "released": released,
    }
    return probe


def write_torch_program(path: Path, width: int = 4096, layers: int = 4) -> None:
    """Write a TorchScript MLP of `layers` width x width fp32 layers (64 MiB each at 4096)."""
    import torch

    torch.manual_seed(0)
    blocks: list[torch.nn.Module] = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.GELU()]
    module = torch.nn.Sequential(*blocks).eval()
    torch.jit.trace(module, torch.zeros(1, width)).save(str(path))


def check_torch(workdir: Path, figures: dict[str, Any]) -> None:
    print("\n== torch: a TorchScript program on CUDA through the torch backend")
    import numpy as np
    import torch

    from actors.types import TensorData
    from actors.worker.backends import Generation
    from actors.worker.backends.loader import load_model
    from actors.worker.protocol import LoadSpec

    path = workdir / "mlp.pt"
    write_torch_program(path)
    batch = np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32)
    gen = Generation(tensors=(TensorData("float32", batch.shape, batch.tobytes()),))
    results: dict[str, np.ndarray] = {}
    for device, on_gpu in DEVICES:
        kind = "nvml" if on_gpu else "cpu"
        model = load_model(LoadSpec(backend="torch", path=str(path), device_kind=kind))
        model.run(gen, lambda _t: None, lambda: False)  # warm-up: kernels, allocator
        began = time.perf_counter()
        for _ in range(20):
            outcome = model.run(gen, lambda _t: None, lambda: False)
        per_call_ms = (time.perf_counter() - began) / 20 * 1000
        assert outcome.tensors is not None
        out = outcome.tensors[0]
        results[device] = np.frombuffer(out.data, dtype=out.dtype).reshape(out.shape)
        row(f"{device}: ms per call (batch 64 x 4096, 4 layers)", f"{per_call_ms:.2f}")
        figures.setdefault("torch", {})[f"{device}_ms_per_call"] = round(per_call_ms, 3)
        model.close()
    diff = float(np.max(np.abs(results["cuda"] - results["cpu"])))
    row("largest |cuda - cpu| difference", f"{diff:.2e}")
    row("torch, CUDA runtime", torch.__version__, torch.version.cuda)
    figures["torch"]["max_abs_diff"] = diff
    figures["torch"]["agrees"] = diff < 1e-2  # TF32 matmuls on Hopper round at ~1e-3


class NodeError(Exception):
    """The node answered an error status; the message holds its body."""


class NodeUnderTest:
    """A real `moc-node run` on the GPU (devices = "auto"), driven over its HTTP API."""

    def __init__(self, workdir: Path, catalog: str) -> None:
        self.rest = free_port()
        config = workdir / "node.toml"
        config.write_text(
            f"""
[node]
name = "gpu-check"
state_dir = "{workdir / "state"}"
model_dirs = ["{workdir}"]

[server]
host = "127.0.0.1"
rest_port = {self.rest}
zmq_port = {free_port()}
grpc_port = 0

[resources]
devices = "auto"
gpu_poll_interval = 0.5

{catalog}
""",
            encoding="utf-8",
        )
        self.log = workdir / "node.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moc_node.cli", "run", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        self.url = f"http://127.0.0.1:{self.rest}"
        wait_http(self.proc, f"{self.url}/ready", self.log, 120)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise NodeError(f"{method} {path}: {exc.code} {exc.read().decode()[:500]}") from None
        return json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode()

    def device(self) -> dict[str, Any]:
        devices = self.call("GET", "/devices")
        listed = devices["devices"] if isinstance(devices, dict) else devices
        return dict(listed[0])

    def model(self, name: str) -> dict[str, Any]:
        listed = self.call("GET", "/models")
        models = listed["models"] if isinstance(listed, dict) else listed
        return next(dict(m) for m in models if m["name"] == name)

    def close(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stop(self.proc)
            return -1


def report_model(node: NodeUnderTest, name: str, figures: dict[str, Any]) -> None:
    """Load `name` and compare the node's estimate and measurement with nvidia-smi's."""
    before = smi_used_mib()
    began = time.perf_counter()
    node.call("POST", "/models", {"model_name": name})
    load_s = time.perf_counter() - began
    info = node.model(name)
    device = node.device()
    pid = info.get("pid")
    by_smi = smi_process_mib(int(pid)) if pid else None
    row(f"{name}: device, load s", info.get("device"), f"{load_s:.2f}")
    row(
        f"{name}: estimate / measured / nvidia-smi MiB",
        info.get("estimate_mb"),
        info.get("memory_mb"),
        by_smi,
    )
    row(f"{name}: device used rose by (nvidia-smi), MiB", f"{smi_used_mib() - before:.0f}")
    row(f"{name}: ledger claimed / free MiB", device["claimed_mb"], device["free_mb"])
    figures.setdefault("models", {})[name] = {
        "device": info.get("device"),
        "estimate_mib": info.get("estimate_mb"),
        "measured_mib": info.get("memory_mb"),
        "smi_process_mib": by_smi,
        "ledger_claimed_mib": device["claimed_mb"],
        "load_s": round(load_s, 2),
    }


def check_node(workdir: Path, figures: dict[str, Any], catalog: str, models: list[str]) -> None:
    node = NodeUnderTest(workdir, catalog)
    try:
        baseline = node.device()
        total = float(smi("memory.total")[0][0])
        row("ledger device, kind", baseline["name"], baseline["kind"])
        row(
            "ledger total / used / free MiB",
            baseline["total_mb"],
            baseline["used_mb"],
            baseline["free_mb"],
        )
        row("nvidia-smi total / used MiB", total, smi_used_mib())
        hold = OutsideAllocation(HOLD_MIB)
        try:
            seen, _ = settle(
                node.device, lambda d: d["used_mb"] >= baseline["used_mb"] + HOLD_MIB, 15
            )
        finally:
            hold.close()
        row(
            f"outside process takes {HOLD_MIB} MiB: ledger used / free",
            seen["used_mb"],
            seen["free_mb"],
        )
        figures["ledger"] = {
            "kind": baseline["kind"],
            "total_mib": baseline["total_mb"],
            "outside_seen_mib": round(seen["used_mb"] - baseline["used_mb"]),
        }
        loaded = []
        for name in models:
            try:
                report_model(node, name, figures)
                loaded.append(name)
            except NodeError as exc:
                row(f"{name}: LOAD FAILED", str(exc))
                figures.setdefault("models", {})[name] = {"error": str(exc)}
        if "g" in loaded and "gcpu" in loaded:
            compare_decoding(node, figures)
        for name in loaded:
            node.call("DELETE", f"/models/{name}")
        after, released = settle(
            node.device,
            lambda d: d["claimed_mb"] == 0 and d["used_mb"] < baseline["used_mb"] + 64,
            30,
        )
        row("after unloading all: ledger claimed / used MiB", after["claimed_mb"], after["used_mb"])
        gpu_lines = [
            line
            for line in node.call("GET", "/metrics").splitlines()
            if line.startswith("moc_gpu_") and not line.startswith("#")
        ]
        for line in gpu_lines:
            print("   ", line)
        figures["ledger"]["released"] = released
    finally:
        code = node.close()
        row("node exit code after SIGTERM", code)
        # The node's log and its workers' logs (llama.cpp reports what it offloaded there).
        for log in sorted(node.log.parent.rglob("*.log")):
            lines = log.read_text(errors="replace").splitlines()
            wanted = [x for x in lines if any(w in x.lower() for w in ("offload", "cuda", "error"))]
            for line in wanted[:12]:
                print(f"    {log.name}: {line[:200]}")


def compare_decoding(node: NodeUnderTest, figures: dict[str, Any]) -> None:
    """Greedy 64-token completions on the offloaded model and its CPU twin: text and speed."""
    prompt = "The quick brown fox"
    out: dict[str, Any] = {}
    for name in ("g", "gcpu"):
        node.call("POST", "/v1/completions", {"model": name, "prompt": prompt, "max_tokens": 4})
        best = 0.0
        text = ""
        for _ in range(3):
            began = time.perf_counter()
            reply = node.call(
                "POST",
                "/v1/completions",
                {"model": name, "prompt": prompt, "max_tokens": 64, "temperature": 0},
            )
            seconds = time.perf_counter() - began
            tokens = reply["usage"]["completion_tokens"]
            best = max(best, tokens / seconds)
            text = reply["choices"][0]["text"]
        out[name] = {"tokens_per_s": round(best, 1), "text": text}
        row(f"{name}: greedy 64 tokens, best of 3, tokens/s", f"{best:.1f}")
    same = out["g"]["text"] == out["gcpu"]["text"]
    row("greedy text on GPU == on CPU", same)
    figures["decode"] = {**out, "same_text": same}


# Ways to load the same GGUF with everything offloaded, from llama-cpp-python alone to the
# node's own worker process, each in a child process: which of them crash says where a crash is.
LOADS = {
    "llama-cpp-python, verbose": (
        "import llama_cpp as l; m = l.Llama(model_path=P, n_ctx=512, n_gpu_layers=-1, verbose=True)"
    ),
    "llama-cpp-python, quiet": (
        "import llama_cpp as l; m = l.Llama(model_path=P, n_ctx=512, n_gpu_layers=-1, verbose=False)"
    ),
    "moc backend, main_gpu 0": (
        "from actors.worker.backends.loader import load_model; from actors.worker.protocol import "
        "LoadSpec; m = load_model(LoadSpec(backend='gguf', path=P, n_ctx=512, gpu_layers=-1, "
        "device_kind='nvml', device_index=0))"
    ),
    "moc backend, no main_gpu": (
        "from actors.worker.backends.loader import load_model; from actors.worker.protocol import "
        "LoadSpec; m = load_model(LoadSpec(backend='gguf', path=P, n_ctx=512, gpu_layers=-1, "
        "device_kind='nvml'))"
    ),
    "moc worker process": (
        "from pathlib import Path; from actors.worker.client import WorkerProcess; "
        "from actors.worker.handle import WorkerSpec; from actors.worker.protocol import LoadSpec; "
        "w = WorkerProcess(WorkerSpec('g', LoadSpec(backend='gguf', path=P, n_ctx=512, "
        "gpu_layers=-1, device_kind='nvml', device_index=0)), runtime_dir=Path(P).parent / 'wrt'); "
        "print(w.start()); w.stop()"
    ),
}
DECODE = """
import time
m("The quick brown fox", max_tokens=4, temperature=0)
began = time.perf_counter()
out = m("The quick brown fox", max_tokens=64, temperature=0)
print("tokens/s", out["usage"]["completion_tokens"] / (time.perf_counter() - began))
"""


def check_loads(path: Path, figures: dict[str, Any]) -> None:
    """Load `path` each way in LOADS; report exit codes, speed and what llama.cpp offloaded."""
    for label, code in LOADS.items():
        script = f"P = {str(path)!r}\n{code}\n" + (DECODE if "llama-cpp" in label else "")
        done = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", script],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        lines = (done.stdout + done.stderr).splitlines()
        speed = [x.split()[-1] for x in lines if x.startswith("tokens/s")]
        row(f"load: {label}: exit code, tokens/s", done.returncode, speed[0][:7] if speed else "")
        if done.returncode != 0:
            for line in lines[-12:]:
                print(f"      {line[:200]}")
        figures.setdefault("loads", {})[label] = done.returncode
    logs = sorted((path.parent / "wrt").glob("*.log"))
    for log in logs:
        for line in log.read_text(errors="replace").splitlines()[-12:]:
            print(f"      worker log: {line[:200]}")


def gguf_catalog(workdir: Path) -> str:
    from actors.gguf_synth import write_preset

    path = write_preset(workdir / "m50.gguf", "medium50m")
    return f"""
[[models.catalog]]
name = "g"
path = "{path}"
n_ctx = 512
gpu_layers = -1

[[models.catalog]]
name = "gcpu"
path = "{path}"
n_ctx = 512
gpu_layers = 0
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated subset")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON last")
    args = parser.parse_args(argv)
    checks = [c for c in args.checks.split(",") if c]
    figures: dict[str, Any] = {"checks": checks}
    try:
        smi("name")
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no NVIDIA GPU here ({exc}): nothing to check")
        return 0
    with tempfile.TemporaryDirectory(prefix="moc-gpu-check-") as tmp:
        workdir = Path(tmp)
        if "nvml" in checks:
            check_nvml(figures)
        if "torch" in checks:
            check_torch(workdir, figures)
        if "node" in checks:
            print("\n== node: moc-node run on the GPU, torch model")
            write_torch_program(workdir / "mlp.pt")
            catalog = f'[[models.catalog]]\nname = "pt"\npath = "{workdir / "mlp.pt"}"\n'
            catalog += 'backend = "torch"\n'
            check_node(workdir, figures, catalog, ["pt"])
        if "gguf" in checks:
            print("\n== gguf: llama.cpp offload through the node")
            probe = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import llama_cpp; print(llama_cpp.llama_supports_gpu_offload())",
                ],
                capture_output=True,
                text=True,
            )
            offload = probe.stdout.strip() == "True"
            row("llama_cpp supports GPU offload", offload or probe.stderr.strip()[-200:])
            figures["gguf_offload_supported"] = offload
            if offload:
                catalog = gguf_catalog(workdir)
                check_loads(workdir / "m50.gguf", figures)
                check_node(workdir, figures, catalog, ["g", "gcpu"])
    if args.json:
        print(json.dumps(figures, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
