"""The memory estimate of a learning job: what it counts, and that the node needs no torch for it."""

from __future__ import annotations

import subprocess
import sys

from actors.learning.estimate import estimate_memory_mb
from actors.learning.gguf_io import LlamaParams
from actors.learning.spec import TrainParams

MODEL = LlamaParams(
    arch="llama",
    n_layer=4,
    n_embd=256,
    n_head=4,
    n_head_kv=4,
    n_ff=512,
    n_vocab=1000,
    rms_eps=1e-5,
    rope_base=10000.0,
    rope_dim=64,
    n_ctx_train=512,
)


def test_full_fine_tuning_needs_more_than_lora_and_a_teacher_adds_its_weights() -> None:
    tp = TrainParams(steps=10, lr=1e-3)
    lora = estimate_memory_mb(MODEL, "lora", tp)
    full = estimate_memory_mb(MODEL, "fine_tune", tp)
    distil = estimate_memory_mb(MODEL, "distillation", tp, teacher=MODEL)
    assert 64 < lora < full < distil


def test_the_estimate_imports_no_torch() -> None:
    code = (
        "import sys, actors.learning.estimate, actors.learning.actor; print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"
