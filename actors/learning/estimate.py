"""A learning job's peak memory, estimated from the model's shape: arithmetic only, no torch.

The node calls it at submit time to claim device memory, so it must not import torch (the
node never does: jobs train in their own processes).
"""

from __future__ import annotations

from actors.learning.gguf_io import LlamaParams
from actors.learning.spec import TrainParams


def estimate_memory_mb(
    params: LlamaParams, job_type: str, tp: TrainParams, teacher: LlamaParams | None = None
) -> float:
    """Estimate a job's peak memory in MiB: float32 weights, gradients, Adam state, activations."""

    def n_params(p: LlamaParams) -> int:
        kv = p.head_dim * p.n_head_kv
        layer = 2 * p.n_embd * p.n_embd + 2 * p.n_embd * kv + 3 * p.n_embd * p.n_ff + 2 * p.n_embd
        return p.n_layer * layer + 2 * p.n_vocab * p.n_embd + p.n_embd

    weights = n_params(params)
    if job_type in ("fine_tune", "distillation"):
        trained = weights
    else:
        per_layer = 7 * tp.lora_rank * (params.n_embd + max(params.n_ff, params.n_embd))
        trained = params.n_layer * per_layer
    floats = weights + 3 * trained  # weights; gradient + two Adam moments per trained value
    if teacher is not None:
        floats += n_params(teacher)
    tokens = tp.batch_size * tp.seq_len * (2 if job_type == "rlhf" else 1)
    # Saved activations per token per layer (~16 n_embd + 4 n_ff), attention maps, logits x3.
    act = tokens * (params.n_layer * (16 * params.n_embd + 4 * params.n_ff) + 3 * params.n_vocab)
    act += tp.batch_size * params.n_head * tp.seq_len * tp.seq_len * params.n_layer * 3
    return (floats + act) * 4 * 1.2 / 2**20 + 64  # 20% slack; 64 MiB for torch itself
