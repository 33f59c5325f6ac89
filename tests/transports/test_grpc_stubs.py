"""The committed gRPC code is what proto/generate.py makes of proto/modelops.proto today, and
its names on the wire are the legacy ones (no proto package)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from transports.grpc_gen import modelops_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("modelops_pb2.py", "modelops_pb2.pyi", "modelops_pb2_grpc.py")


def test_the_committed_generated_code_matches_a_fresh_generation_from_the_proto(
    tmp_path: Path,
) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "transports" / "grpc_gen" / name).read_text()
        committed = (ROOT / "transports" / "grpc_gen" / name).read_text()
        assert committed == fresh, f"{name} is stale: run `make proto` (proto/generate.py)"


def test_the_service_and_messages_have_no_package_so_methods_live_at_slash_modelops() -> None:
    service = pb.DESCRIPTOR.services_by_name["ModelOps"]
    assert pb.DESCRIPTOR.package == ""
    assert service.full_name == "ModelOps"
    assert {m.name for m in service.methods} == {
        "Infer",
        "LoadModel",
        "UnloadModel",
        "ListModels",
        "GetSystemStatus",
        "HealthCheck",
        "InferStream",
    }
    assert pb.InferenceRequest.DESCRIPTOR.full_name == "InferenceRequest"


def test_the_legacy_fields_keep_their_numbers() -> None:
    legacy = {
        pb.InferenceRequest: {
            "model_name": 1, "input_text": 2, "max_tokens": 3, "temperature": 4, "top_p": 5,
            "stop_sequences": 6,
        },
        pb.InferenceResponse: {
            "output_text": 1, "tokens_generated": 2, "latency_ms": 3, "model_version": 4,
            "success": 5, "error_message": 6,
        },
        pb.ModelLoadRequest: {
            "model_name": 1, "model_path": 2, "model_type": 3, "quantization": 4, "gpu_layers": 5,
        },
        pb.ModelLoadReply: {"success": 1, "message": 2, "model_version": 3, "memory_usage_mb": 4},
    }
    for message, numbers in legacy.items():
        fields = message.DESCRIPTOR.fields_by_name
        assert {name: fields[name].number for name in numbers} == numbers, message.__name__
