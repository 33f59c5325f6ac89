"""Plain values that cross actor, process and transport boundaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Backend = Literal["gguf", "torch"]

DEFAULT_N_CTX = 2048
"""A model's context in tokens when neither its catalog entry nor the load request names one:
llama.cpp's own default in its examples, and what a small model is trained for (a model trained
for less is capped to what it was trained for)."""
FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class TensorData:
    """One tensor on the wire: raw little-endian bytes with dtype and shape (never a pickle)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """How one request samples and how long it may run: the only place these defaults are
    written (the transports, the worker's wire and the backends all take them from here).

    A request that names no parameter gets these, whichever front it came through.
    """

    max_tokens: int = 50
    """Most tokens to generate (the context may end it sooner)."""
    temperature: float = 0.7
    """0 is greedy; higher flattens the distribution."""
    top_p: float = 0.9
    """Nucleus sampling: draw only from the likeliest tokens that cover this probability."""
    stop: tuple[str, ...] = ()
    """Text that ends the output; never part of it."""
    seed: int | None = None
    """The draw's seed; None takes the worker's (LoadSpec.seed)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated, once (OpenAI: -2..2)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated (OpenAI: -2..2)."""
    repeat_penalty: float = 1.0
    """llama.cpp's repetition penalty: a generated token's positive logit is divided by it, a
    negative one multiplied (1: off)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to those tokens' logits; -100 bans a token, +100 forces it."""
    json_schema: str | None = None
    """Constrain the output to JSON that this JSON Schema (as JSON text) accepts; None: free
    text. OpenAI's `json_object` is the schema `{"type": "object"}`."""
    logprobs: int | None = None
    """Report each generated token's log probability with this many likeliest alternatives
    (0..20); None reports none."""


TokenLogprob = tuple[bytes, float, tuple[tuple[bytes, float], ...]]
"""One generated token: its bytes, its log probability, and the likeliest tokens at its place
(bytes and log probability, likeliest first). Bytes, not text: a token may hold part of a
character."""


@dataclass(frozen=True, slots=True)
class InferRequest:
    """One inference: exactly one of `prompt`, `messages` or `tensors` is set.

    A prompt is text, or the token ids of the model's vocabulary (OpenAI's token-array prompt).
    """

    model: str
    prompt: str | tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None
    tensors: tuple[TensorData, ...] | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class InferResult:
    text: str
    tokens_generated: int
    prompt_tokens: int
    finish_reason: FinishReason
    latency_ms: float
    model_version: str
    tensors: tuple[TensorData, ...] | None = None
    prompt_tokens_reused: int = 0  # prompt tokens not decoded again: their KV was cached
    first_token_ms: float | None = None  # in the worker: from taking it to the first token
    logprobs: tuple[TokenLogprob, ...] | None = None  # when the request asked for them


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """Embed each input with a GGUF model: text, or token ids of the model's vocabulary."""

    model: str
    inputs: tuple[str | tuple[int, ...], ...]
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """One vector per input, in order: L2-normalised, each little-endian float32 bytes."""

    vectors: tuple[bytes, ...]
    prompt_tokens: int
    latency_ms: float
    model_version: str


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """A piece of streamed text; the stream ends with one InferResult."""

    text: str


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """Load a model by catalog name, or by path inside the model directories."""

    name: str
    path: str | None = None
    backend: Backend | None = None
    n_ctx: int | None = None
    gpu_layers: int | None = None
    pin: bool | None = None
    quantization: str | None = None


DeviceKind = Literal["nvml", "cpu", "simulated"]
ModelState = Literal["available", "loading", "loaded", "unloading", "failed"]
BreakerState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One device as the ledger sees it; memory in MiB."""

    name: str
    kind: DeviceKind
    total_mb: float
    used_mb: float  # measured by the probe
    claimed_mb: float  # sum of the claims of the models placed here
    free_mb: float  # min(measured free, total - claimed - reserve)
    utilization_percent: float | None = None
    temperature_c: float | None = None

    @property
    def simulated(self) -> bool:
        return self.kind == "simulated"

    @property
    def label(self) -> str:
        """The name as every listing shows it: simulated devices say so."""
        return f"{self.name} (simulated)" if self.simulated else self.name


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    backend: Backend
    path: str
    state: ModelState
    device: str | None = None
    estimate_mb: float | None = None
    memory_mb: float | None = None  # measured after load
    pinned: bool = False
    in_flight: int = 0
    queued: int = 0
    last_used: float | None = None  # unix seconds
    breaker: BreakerState = "closed"
    version: str = ""
    n_ctx: int | None = None
    load_seconds: float | None = None
    error: str | None = None
    pid: int | None = None  # the worker process
    adapter: str | None = None  # a LoRA adapter applied on top of `path`
    chat_template: str | None = None  # what chat is rendered with: "model", "chatml"; None: no chat
    slots: int | None = None  # requests it decodes at once while loaded (its `parallel`)


HealthStatus = Literal["healthy", "degraded", "unhealthy"]


@dataclass(frozen=True, slots=True)
class ComponentHealth:
    status: HealthStatus
    detail: str = ""


@dataclass(frozen=True, slots=True)
class HealthReport:
    status: HealthStatus
    components: dict[str, ComponentHealth]
