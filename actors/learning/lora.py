"""Low-rank adapters (LoRA) on the projection weights of a LlamaTorch model.

An adapter on weight W (out, in) adds `scale * B @ (A @ x)` with A (rank, in), B (out, rank)
and `scale = alpha / rank`: exactly what llama.cpp computes for a GGUF LoRA adapter
(`llm_build_lora_mm`), so the trained adapter and the served one agree. B starts at zero, so a
fresh adapter leaves the model unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from actors.learning.llama_torch import LlamaTorch

DEFAULT_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


class LoraAdapter(nn.Module):
    """The A and B matrices of one adapted weight."""

    def __init__(self, n_in: int, n_out: int, rank: int, alpha: float, gen: torch.Generator):
        super().__init__()
        self.rank = rank
        self.alpha = alpha
        bound = 1.0 / math.sqrt(n_in)  # PEFT's kaiming-uniform(a=sqrt(5)) bound for A
        self.a = nn.Parameter(torch.empty(rank, n_in).uniform_(-bound, bound, generator=gen))
        self.b = nn.Parameter(torch.zeros(n_out, rank))

    @property
    def scale(self) -> float:
        """Return alpha / rank, the factor llama.cpp applies to B @ A @ x."""
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the adapter's contribution to the adapted linear's output."""
        return (x @ self.a.t() @ self.b.t()) * self.scale


def attach_lora(
    model: LlamaTorch,
    *,
    rank: int,
    alpha: float,
    seed: int,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
) -> dict[str, LoraAdapter]:
    """Add fresh adapters to every layer's `targets` projections; return them by weight name."""
    gen = torch.Generator().manual_seed(seed)
    adapters: dict[str, LoraAdapter] = {}
    for name in model.linear_names():
        if name.split(".")[2] not in targets:
            continue
        n_out, n_in = model.weight(name).shape
        adapters[name] = LoraAdapter(int(n_in), int(n_out), rank, alpha, gen)
    model.adapters.update(adapters)
    model.set_trainable(())
    return adapters


def lora_parameters(adapters: dict[str, LoraAdapter]) -> list[nn.Parameter]:
    """Return the trainable parameters of `adapters` in a stable order."""
    return [p for name in sorted(adapters) for p in (adapters[name].a, adapters[name].b)]
