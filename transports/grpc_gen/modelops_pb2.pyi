# mypy: ignore-errors
# ruff: noqa
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InferenceRequest(_message.Message):
    __slots__ = ("model_name", "input_text", "max_tokens", "temperature", "top_p", "stop_sequences")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    input_text: str
    max_tokens: int
    temperature: float
    top_p: float
    stop_sequences: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_name: _Optional[str] = ..., input_text: _Optional[str] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., stop_sequences: _Optional[_Iterable[str]] = ...) -> None: ...

class InferenceResponse(_message.Message):
    __slots__ = ("output_text", "tokens_generated", "latency_ms", "model_version", "success", "error_message", "prompt_tokens", "finish_reason")
    OUTPUT_TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    output_text: str
    tokens_generated: int
    latency_ms: float
    model_version: str
    success: bool
    error_message: str
    prompt_tokens: int
    finish_reason: str
    def __init__(self, output_text: _Optional[str] = ..., tokens_generated: _Optional[int] = ..., latency_ms: _Optional[float] = ..., model_version: _Optional[str] = ..., success: _Optional[bool] = ..., error_message: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class InferenceChunk(_message.Message):
    __slots__ = ("text", "result")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    text: str
    result: InferenceResponse
    def __init__(self, text: _Optional[str] = ..., result: _Optional[_Union[InferenceResponse, _Mapping]] = ...) -> None: ...

class ModelLoadRequest(_message.Message):
    __slots__ = ("model_name", "model_path", "model_type", "quantization", "gpu_layers")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    GPU_LAYERS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_path: str
    model_type: str
    quantization: bool
    gpu_layers: int
    def __init__(self, model_name: _Optional[str] = ..., model_path: _Optional[str] = ..., model_type: _Optional[str] = ..., quantization: _Optional[bool] = ..., gpu_layers: _Optional[int] = ...) -> None: ...

class ModelLoadReply(_message.Message):
    __slots__ = ("success", "message", "model_version", "memory_usage_mb", "device")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USAGE_MB_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    model_version: str
    memory_usage_mb: int
    device: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., model_version: _Optional[str] = ..., memory_usage_mb: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class ModelUnloadRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class ModelUnloadReply(_message.Message):
    __slots__ = ("success", "message", "memory_freed_mb")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREED_MB_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    memory_freed_mb: int
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., memory_freed_mb: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_name", "backend", "state", "device", "memory_usage_mb", "model_version", "in_flight", "queued", "breaker", "pinned", "n_ctx", "error")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USAGE_MB_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    BREAKER_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    backend: str
    state: str
    device: str
    memory_usage_mb: int
    model_version: str
    in_flight: int
    queued: int
    breaker: str
    pinned: bool
    n_ctx: int
    error: str
    def __init__(self, model_name: _Optional[str] = ..., backend: _Optional[str] = ..., state: _Optional[str] = ..., device: _Optional[str] = ..., memory_usage_mb: _Optional[int] = ..., model_version: _Optional[str] = ..., in_flight: _Optional[int] = ..., queued: _Optional[int] = ..., breaker: _Optional[str] = ..., pinned: _Optional[bool] = ..., n_ctx: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class ModelList(_message.Message):
    __slots__ = ("models", "truncated")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    truncated: bool
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class DeviceStatus(_message.Message):
    __slots__ = ("name", "kind", "simulated", "total_mb", "used_mb", "claimed_mb", "free_mb", "utilization_percent", "temperature_c")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MB_FIELD_NUMBER: _ClassVar[int]
    USED_MB_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_MB_FIELD_NUMBER: _ClassVar[int]
    FREE_MB_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    simulated: bool
    total_mb: float
    used_mb: float
    claimed_mb: float
    free_mb: float
    utilization_percent: float
    temperature_c: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., simulated: _Optional[bool] = ..., total_mb: _Optional[float] = ..., used_mb: _Optional[float] = ..., claimed_mb: _Optional[float] = ..., free_mb: _Optional[float] = ..., utilization_percent: _Optional[float] = ..., temperature_c: _Optional[float] = ...) -> None: ...

class SystemStatus(_message.Message):
    __slots__ = ("name", "version", "uptime_s", "ready", "draining", "devices", "models")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    uptime_s: float
    ready: bool
    draining: bool
    devices: _containers.RepeatedCompositeFieldContainer[DeviceStatus]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., ready: _Optional[bool] = ..., draining: _Optional[bool] = ..., devices: _Optional[_Iterable[_Union[DeviceStatus, _Mapping]]] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ComponentHealth(_message.Message):
    __slots__ = ("status", "detail")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    status: str
    detail: str
    def __init__(self, status: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "timestamp", "components")
    class ComponentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ComponentHealth
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ComponentHealth, _Mapping]] = ...) -> None: ...
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    status: str
    timestamp: str
    components: _containers.MessageMap[str, ComponentHealth]
    def __init__(self, status: _Optional[str] = ..., timestamp: _Optional[str] = ..., components: _Optional[_Mapping[str, ComponentHealth]] = ...) -> None: ...
