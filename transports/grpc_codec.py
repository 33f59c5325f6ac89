"""The gRPC adapter's pure half: proto messages to action payloads, results back, errors to codes.

The ModelOps methods run the actions of `transports.dispatch`'s table, so validation, limits and
errors are those of ZMQ and REST; this module only translates. No I/O, no grpc server objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from actors.types import InferResult
from transports.errors import ErrorReply
from transports.grpc_gen import modelops_pb2 as pb

__all__ = [
    "CODE_BY_ERROR",
    "CODE_BY_STATUS",
    "GrpcError",
    "Refused",
    "grpc_error",
    "health_reply",
    "infer_payload",
    "infer_reply",
    "load_payload",
    "load_reply",
    "model_info",
    "model_list",
    "stream_result",
    "system_status",
    "unload_payload",
    "unload_reply",
]


# ---- errors ----

# One table: the status `transports.errors.classify` gives (what REST answers) to a gRPC code.
CODE_BY_STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# Where one status holds errors a gRPC client must tell apart: a full bulkhead is
# RESOURCE_EXHAUSTED (retry here, later), while a draining node, an open breaker or a peer down
# stay UNAVAILABLE (try elsewhere); a deposed primary's command is ABORTED, not ALREADY_EXISTS.
CODE_BY_ERROR: dict[str, grpc.StatusCode] = {
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "stale_term": grpc.StatusCode.ABORTED,
}


@dataclass(frozen=True, slots=True)
class GrpcError:
    """A refusal as a gRPC client sees it: status code, details, trailing metadata."""

    code: grpc.StatusCode
    details: str
    trailers: tuple[tuple[str, str], ...]


class Refused(Exception):
    """A call the gRPC front refuses by itself (no node error): counted as `outcome`."""

    def __init__(self, outcome: str, error: GrpcError) -> None:
        super().__init__(error.details)
        self.outcome = outcome
        self.error = error


def grpc_error(err: ErrorReply) -> GrpcError:
    """Return the gRPC status, details and trailers of the client-facing error `err`.

    Trailers: `moc-error-code` (the code ZMQ and REST answer), `moc-error-field` when a field is
    at fault, `retry-after` (seconds, as HTTP's header) when retrying later makes sense.
    """
    code = CODE_BY_ERROR.get(err.code) or CODE_BY_STATUS.get(err.status, grpc.StatusCode.UNKNOWN)
    trailers = [("moc-error-code", err.code)]
    if err.field is not None:
        trailers.append(("moc-error-field", err.field))
    if err.retry_after is not None:
        trailers.append(("retry-after", f"{err.retry_after:g}"))
    return GrpcError(code, err.message, tuple(trailers))


# ---- requests: proto message -> the action's payload ----


def infer_payload(req: pb.InferenceRequest) -> dict[str, Any]:
    """Return the legacy infer payload of `req`; an unset optional field takes its default."""
    payload: dict[str, Any] = {
        "model_name": req.model_name,
        "input_text": req.input_text,
        "stop_sequences": list(req.stop_sequences),
    }
    for field in ("max_tokens", "temperature", "top_p"):
        if req.HasField(field):
            payload[field] = getattr(req, field)
    return payload


def load_payload(req: pb.ModelLoadRequest) -> dict[str, Any]:
    """Return the legacy load payload of `req` (empty strings and false are "not sent")."""
    payload: dict[str, Any] = {"model_name": req.model_name}
    if req.model_path:
        payload["model_path"] = req.model_path
    if req.model_type:
        payload["model_type"] = req.model_type
    if req.quantization:
        payload["quantization"] = True
    if req.HasField("gpu_layers"):
        payload["gpu_layers"] = req.gpu_layers
    return payload


def unload_payload(req: pb.ModelUnloadRequest) -> dict[str, Any]:
    """Return the unload payload of `req`."""
    return {"model_name": req.model_name}


# ---- results: the action's JSON view -> proto message ----


def infer_reply(view: Mapping[str, Any]) -> pb.InferenceResponse:
    """Return the InferenceResponse of an infer result view (`dispatch.infer_result_view`)."""
    return pb.InferenceResponse(
        output_text=view["output_text"],
        tokens_generated=view["tokens_generated"],
        latency_ms=view["latency_ms"],
        model_version=view["model_version"],
        success=True,
        prompt_tokens=view["prompt_tokens"],
        finish_reason=view["finish_reason"],
    )


def stream_result(result: InferResult) -> pb.InferenceChunk:
    """Return the last chunk of a stream: the figures, no text (the pieces were the text)."""
    return pb.InferenceChunk(
        result=pb.InferenceResponse(
            tokens_generated=result.tokens_generated,
            latency_ms=result.latency_ms,
            model_version=result.model_version,
            success=True,
            prompt_tokens=result.prompt_tokens,
            finish_reason=result.finish_reason,
        )
    )


def _mb(value: Any) -> int:
    return round(value) if isinstance(value, int | float) else 0


def load_reply(view: Mapping[str, Any]) -> pb.ModelLoadReply:
    """Return the ModelLoadReply of a load result view."""
    return pb.ModelLoadReply(
        success=True,
        message=f"model {view['name']} loaded",
        model_version=view.get("version") or "",
        memory_usage_mb=_mb(view.get("memory_mb")),
        device=view.get("device") or "",
    )


def unload_reply(view: Mapping[str, Any]) -> pb.ModelUnloadReply:
    """Return the ModelUnloadReply of an unload result view."""
    return pb.ModelUnloadReply(
        success=True,
        message=f"model {view['name']} unloaded",
        memory_freed_mb=_mb(view.get("memory_mb")),
    )


def model_info(m: Mapping[str, Any]) -> pb.ModelInfo:
    """Return one model of a list or status view (the fields of `actors.types.ModelInfo`)."""
    return pb.ModelInfo(
        model_name=m["name"],
        backend=m.get("backend") or "",
        state=m.get("state") or "",
        device=m.get("device") or "",
        memory_usage_mb=_mb(m.get("memory_mb")),
        model_version=m.get("version") or "",
        in_flight=m.get("in_flight") or 0,
        queued=m.get("queued") or 0,
        breaker=m.get("breaker") or "",
        pinned=bool(m.get("pinned")),
        n_ctx=m.get("n_ctx") or 0,
        error=m.get("error") or "",
    )


def model_list(view: Mapping[str, Any]) -> pb.ModelList:
    """Return the ModelList of a list_models page; `truncated` when more models follow."""
    return pb.ModelList(
        models=[model_info(m) for m in view["models"]],
        truncated=view.get("next_offset") is not None,
    )


def _device(d: Mapping[str, Any]) -> pb.DeviceStatus:
    status = pb.DeviceStatus(
        name=d["name"],
        kind=d.get("kind") or "",
        simulated=bool(d.get("simulated")),
        total_mb=d.get("total_mb") or 0.0,
        used_mb=d.get("used_mb") or 0.0,
        claimed_mb=d.get("claimed_mb") or 0.0,
        free_mb=d.get("free_mb") or 0.0,
    )
    for field in ("utilization_percent", "temperature_c"):
        if d.get(field) is not None:
            setattr(status, field, d[field])
    return status


def system_status(view: Mapping[str, Any]) -> pb.SystemStatus:
    """Return the SystemStatus of the status view (`NodeAPI.status`)."""
    devices: Sequence[Mapping[str, Any]] = view.get("devices") or ()
    models: Sequence[Mapping[str, Any]] = view.get("models") or ()
    return pb.SystemStatus(
        name=view.get("name") or "",
        version=view.get("version") or "",
        uptime_s=view.get("uptime_s") or 0.0,
        ready=bool(view.get("ready")),
        draining=bool(view.get("draining")),
        devices=[_device(d) for d in devices],
        # A model is an object (LocalNode.status: every ModelInfo field); a bare name is taken too.
        models=[
            model_info(m) if isinstance(m, Mapping) else pb.ModelInfo(model_name=str(m))
            for m in models
        ],
    )


def health_reply(view: Mapping[str, Any]) -> pb.HealthResponse:
    """Return the HealthResponse of a health view (details absent for an anonymous caller)."""
    reply = pb.HealthResponse(status=view["status"], timestamp=view["timestamp"])
    for name, component in (view.get("components") or {}).items():
        reply.components[name].status = component.get("status") or ""
        reply.components[name].detail = component.get("detail") or ""
    return reply
