"""Configuration of the actors package: devices, models, resilience.

One frozen dataclass per TOML section; `moc_node.config` composes them and checks types. Each
`__post_init__` checks values and raises `ValueError("key: reason")` naming the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from actors.names import name_problem
from actors.types import DEFAULT_N_CTX

DeviceMode = Literal["auto", "cpu", "simulated"]

MAX_PARALLEL = 64
"""Most slots one model may have (llama.cpp's own limit on sequences per context is 256)."""

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str | float | int) -> float | None:
    """Parse an Ollama-style keep-alive ("5m", "30s", "1h", 0, -1) into seconds; None = forever."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        match = _DURATION.match(text)
        if match is None:
            raise ValueError(f"not a duration: {text!r} (use e.g. '5m', '30s', '-1')")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return None if seconds < 0 else seconds


def _require(cond: bool, key: str, reason: str) -> None:
    if not cond:
        raise ValueError(f"{key}: {reason}")


@dataclass(frozen=True, slots=True)
class SimulatedDevice:
    """A device that exists only in config, for placement tests on machines without a GPU."""

    name: str
    """Device name; every listing shows it as "NAME (simulated)"."""
    total_mb: int = 24576
    """Memory of the simulated device in MiB."""

    def __post_init__(self) -> None:
        _require(bool(self.name), "name", "must not be empty")
        _require(self.total_mb > 0, "total_mb", "must be > 0")


@dataclass(frozen=True, slots=True)
class ResourcesConfig:
    """[resources]: which devices the node uses and how it budgets their memory."""

    devices: DeviceMode = "auto"
    """"auto" uses NVML GPUs and falls back to the CPU when NVML is absent; "cpu" forces the host
    CPU with its RAM as the device memory; "simulated" uses the `simulated` list (tests, demos)."""
    gpu_poll_interval: float = 5.0
    """Seconds between measurements of each device. Shorter catches foreign memory use sooner at
    the cost of NVML calls; 5 s is the legacy default."""
    vram_soft_limit_mb: int = 0
    """Per-device cap in MiB on what models may claim; 0 = no cap beyond the device's size."""
    eviction_threshold_pct: float = 90.0
    """Claims may fill at most this percent of a device; past it idle models are evicted first.
    Leaves room for allocator fragmentation and other processes."""
    reserve_mb: int = 512
    """MiB kept free on every device for drivers and CUDA contexts (Ollama keeps a similar
    per-GPU minimum)."""
    simulated: tuple[SimulatedDevice, ...] = ()
    """Devices used when `devices = "simulated"`."""
    worker_memory_limit_mb: int = 0
    """Most memory one model worker process may hold on its device, in MiB: its RSS on the CPU,
    what NVML reports for the process on a GPU. Checked every `gpu_poll_interval`; a worker past
    it is killed, its requests fail saying so, and the circuit breaker and restart apply as for
    any crash. 0 = no limit (the default): the ledger already budgets each model's claim, and a
    model's working size grows legitimately as its context fills, so a node-wide number would
    have to be chosen per deployment (e.g. the largest model's working size plus a margin)."""

    cpu_threads: int = 0
    """Threads the models held on the CPU (or a simulated device) decode with, together: each
    gets its catalog `threads`, the others an even share of the rest, at least one each, and
    the shares are recomputed as models come and go. 0 = the physical cores this process may
    run on, llama.cpp's own choice for one model: more threads than cores make its spinning
    threads preempt each other. Models on a GPU are not counted."""
    worker_nice: int = 5
    """How much lower than the node the model workers run (nice, 0..19). Their decode threads
    keep every core busy on the CPU, and the node's event loop (requests, streams, health, gossip
    probes) should not queue behind them: on 2 cores, 8 closed-loop streams with the worker
    reniced by hand had TTFT p50 6.2-13.0 ms at 0 and 3.4-5.5 ms at 5, tokens/s unchanged within
    run-to-run noise. 0 = the node's own priority."""
    huge_pages: bool = True
    """Start model workers with glibc's `glibc.malloc.hugetlb=1` tunable, so that the memory
    they allocate (the weights of a model read into memory on the CPU, its KV cache) asks the
    kernel for transparent huge pages: under the `madvise` THP mode (Debian's and Ubuntu's
    default) nothing gets them otherwise. A decode reads every weight once a token, and 2 MiB
    pages take the TLB misses of 4 KiB ones off that read: 1 stream on a ~51M-parameter f32
    model, 2 cores, +2.8-6.6% tokens/s (four alternated pairs; 8 streams -0.1% and +10.3%),
    RSS +0.7%; a worker's heap then grows a 2 MiB page at a time (a ~0.1M-parameter model's
    worker: 7.0 or 8.9 MiB). No effect where THP is `never` (nothing to ask for) or `always`
    (already given), nor on a GPU's memory. A `glibc.malloc.hugetlb` the node's own environment sets is kept. The kernel may
    compact memory to find 2 MiB pages when a load touches its weights (a slower load on a
    fragmented host), and glibc ignores the tunable in a process with file capabilities
    (secure mode) or before 2.35: each worker's log says how much it got."""

    def __post_init__(self) -> None:
        _require(
            self.devices in ("auto", "cpu", "simulated"), "devices", "one of auto, cpu, simulated"
        )
        _require(0 <= self.cpu_threads <= 4096, "cpu_threads", "must be in 0..4096")
        _require(0 <= self.worker_nice <= 19, "worker_nice", "must be in 0..19")
        _require(self.gpu_poll_interval > 0, "gpu_poll_interval", "must be > 0 seconds")
        _require(self.vram_soft_limit_mb >= 0, "vram_soft_limit_mb", "must be >= 0")
        _require(
            0 < self.eviction_threshold_pct <= 100, "eviction_threshold_pct", "must be in (0, 100]"
        )
        _require(self.reserve_mb >= 0, "reserve_mb", "must be >= 0")
        _require(self.worker_memory_limit_mb >= 0, "worker_memory_limit_mb", "must be >= 0")
        _require(
            self.devices != "simulated" or bool(self.simulated),
            "simulated",
            'devices = "simulated" needs at least one [[resources.simulated]] entry',
        )


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """[[models.catalog]]: a model the node may serve, loaded on first use or preloaded."""

    name: str
    """Name clients use (`model_name`, OpenAI `model`)."""
    path: str
    """GGUF file, TorchScript `.pt` or torch.export `.pt2`; must lie inside `node.model_dirs`."""
    backend: Literal["gguf", "torch"] = "gguf"
    """Which worker backend runs it."""
    n_ctx: int = DEFAULT_N_CTX
    """Context length in tokens; the KV cache grows linearly with it."""
    n_ctx_max: int = 0
    """Largest `n_ctx` a load of this model may ask for (this entry's or a client's); 0 = the
    context the model was trained for (the GGUF's `<arch>.context_length`). Set it above that
    only for a model that extends its context (RoPE scaling): a longer context costs memory
    (the estimate grows with it) and gives no better answers."""
    gpu_layers: int = -1
    """Layers offloaded to the GPU (-1 = all); ignored on the CPU device."""
    preload: bool = False
    """Load at start instead of on first request."""
    pin: bool = False
    """Never evict or expire this model."""
    lora: str = ""
    """A GGUF LoRA adapter llama.cpp applies on top of `path` (learning jobs register these);
    empty for none."""
    cpu_repack: bool | None = None
    """Overrides `[models] cpu_repack` for this model: true lets llama.cpp repack this model's
    CPU-resident weights, false forbids it; unset follows the node's setting."""
    parallel: int = 0
    """Overrides `[models] parallel` for this model (1..64); 0 = the node's setting."""
    threads: int = 0
    """Decode threads of this model on the CPU (1..4096), taken from `[resources] cpu_threads`
    before the other models share the rest; 0 = an even share. On a GPU, the threads of its
    CPU-resident layers."""

    def __post_init__(self) -> None:
        problem = name_problem(self.name)  # the rule clients' names follow, so they can ask
        _require(problem is None, "name", str(problem))
        _require(bool(self.path), "path", "must not be empty")
        _require(self.backend in ("gguf", "torch"), "backend", "one of gguf, torch")
        _require(16 <= self.n_ctx <= 1_048_576, "n_ctx", "must be in 16..1048576")
        _require(0 <= self.n_ctx_max <= 1_048_576, "n_ctx_max", "must be in 0..1048576")
        _require(self.gpu_layers >= -1, "gpu_layers", "must be >= -1")
        _require(0 <= self.threads <= 4096, "threads", "must be in 0..4096")
        _require(
            self.parallel == 0 or 1 <= self.parallel <= MAX_PARALLEL,
            "parallel",
            f"must be 0 (the node's setting) or in 1..{MAX_PARALLEL}",
        )


@dataclass(frozen=True, slots=True)
class ModelsConfig:
    """[models]: how long models stay loaded and which ones exist."""

    keep_alive: str = "5m"
    """Idle time after which an unpinned model is unloaded ("5m", "30s", "0" = at once after each
    request, "-1" = never). Ollama's default: long enough to keep a chat warm."""
    max_loaded: int = 0
    """Most models loaded at once; 0 = no count limit, memory decides."""
    load_timeout: float = 300.0
    """Seconds a model load may take before it is failed (Ollama: 5 m)."""
    preload: tuple[str, ...] = ()
    """Legacy key: catalog names to load at start (same as `preload = true` on the entry)."""
    catalog: tuple[CatalogEntry, ...] = ()
    """The models this node may serve."""
    cpu_repack: bool = False
    """Let llama.cpp repack GGUF weights held on the CPU into its CPU-specific layouts
    ("extra buffer types": AMX tiles on Intel Xeons with AMX, interleaved q4_0 blocks on
    AVX2/AVX-512 and Arm), as its default does. Repacking makes CPU decoding of q4_0 weights
    faster (1.35-1.74x decode, 1.30-1.47x prompt tokens/s on an AVX-512 AMD EPYC, one thread:
    bench/cpu_buffers.py) and changes nothing for f16/f32 weights, for q8_0 on CPUs without AMX,
    or for layers on a GPU. Off by default because llama.cpp's AMX matmul
    crashes (SIGSEGV) decoding q8_0 and q4_0 models on Sapphire Rapids and later Xeons, the
    CPUs most H100/H200 servers carry (ggml-org/llama.cpp#20824): a crash on every request
    costs more than the speed. Turn on for CPUs without AMX, or per model with the catalog
    entry's `cpu_repack`."""
    parallel: int = 1
    """Requests a GGUF model serves at once, like llama-server's `-np` (1..64). Above 1 they are
    batched in one llama.cpp context, one sequence (slot) each, and every slot has its own
    `n_ctx` of KV cache: the memory estimate and claim grow with `n_ctx * parallel`. Further
    requests wait for a free slot. 1 is one slot: requests run one after another, on the same
    engine. Torch models serve one at a time whatever this says. A catalog entry's `parallel` overrides it."""

    def __post_init__(self) -> None:
        try:
            parse_duration(self.keep_alive)
        except ValueError as exc:
            raise ValueError(f"keep_alive: {exc}") from None
        _require(self.max_loaded >= 0, "max_loaded", "must be >= 0")
        _require(self.load_timeout > 0, "load_timeout", "must be > 0 seconds")
        _require(1 <= self.parallel <= MAX_PARALLEL, "parallel", f"must be in 1..{MAX_PARALLEL}")
        names = [entry.name for entry in self.catalog]
        _require(len(names) == len(set(names)), "catalog", "model names must be unique")
        for name in self.preload:
            _require(name in names, "preload", f"{name!r} is not in the catalog")

    @property
    def keep_alive_seconds(self) -> float | None:
        """Keep-alive in seconds; None means forever."""
        return parse_duration(self.keep_alive)

    def cpu_repack_for(self, entry: CatalogEntry) -> bool:
        """Return whether `entry` loads with llama.cpp's CPU repacking (its override, else ours)."""
        return self.cpu_repack if entry.cpu_repack is None else entry.cpu_repack


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    """How a failing model worker is cut off and retried."""

    failure_threshold: int = 4
    """Consecutive worker failures that open the breaker."""
    reset_timeout: float = 20.0
    """Seconds the breaker stays open before one trial request (half-open)."""

    def __post_init__(self) -> None:
        _require(self.failure_threshold >= 1, "failure_threshold", "must be >= 1")
        _require(self.reset_timeout > 0, "reset_timeout", "must be > 0 seconds")


@dataclass(frozen=True, slots=True)
class BulkheadConfig:
    """Per-model admission limits: past them a request is refused at once as overloaded."""

    max_concurrent: int = 64
    """Requests admitted to a model's actor at once (one decodes, the rest wait in its mailbox)."""
    max_queue_size: int = 256
    """Further requests allowed to wait for admission (e.g. while the model loads)."""

    def __post_init__(self) -> None:
        _require(self.max_concurrent >= 1, "max_concurrent", "must be >= 1")
        _require(self.max_queue_size >= 0, "max_queue_size", "must be >= 0")


@dataclass(frozen=True, slots=True)
class ResilienceConfig:
    """[resilience]: circuit breaker and bulkhead settings, per model."""

    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    """Per-model breaker around the worker process (an inline table)."""
    bulkhead: BulkheadConfig = field(default_factory=BulkheadConfig)
    """Per-model admission limits (an inline table)."""
