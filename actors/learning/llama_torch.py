"""A torch forward pass of the llama architecture with llama.cpp's arithmetic.

The model keeps each weight under its GGUF name, so adapters and exports map one to one. What
follows llama.cpp (src/llama-model.cpp `llm_build_llama`, ggml-cpu ops):

- RMSNorm `x * rsqrt(mean(x^2) + eps) * w` with the model's eps;
- RoPE of type "normal": adjacent pairs (2i, 2i+1) rotate, because the GGUF converter permuted Q
  and K for it; angles `pos * base^(-2i/n_rot)` built by repeated float32 multiplication as
  ggml's rope cache does;
- grouped KV heads: query head h reads KV head h // (n_head / n_head_kv);
- softmax(QK^T / sqrt(head_dim)) with a causal mask, SwiGLU feed-forward, a tied output head when
  `output.weight` is absent.

`emulate=True` also copies llama.cpp's rounding on the CPU, for exact comparisons: K and V live
in an f16 KV cache (so Q and the softmax probabilities are rounded to f16 for the two attention
products), and a matmul against an f16 (q8_0) weight first rounds its input to f16 (q8_0
blocks). Training leaves it off: the rounding carries no useful gradient.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from actors.learning.errors import UnsupportedModel
from actors.learning.gguf_io import GgufWeights, LlamaParams

LAYER_LINEARS = (
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)


def _key(name: str) -> str:
    """ParameterDict keys may not contain dots."""
    return name.replace(".", "/")


def rope_angles(params: LlamaParams, n_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (cos, sin) of shape (n_pos, rope_dim // 2), float32 as ggml computes them."""
    half = params.rope_dim // 2
    scale = np.float32(params.rope_base) ** np.float32(-2.0 / params.rope_dim)
    theta = np.empty((n_pos, half), dtype=np.float32)
    theta[:, 0] = np.arange(n_pos, dtype=np.float32)
    for i in range(1, half):
        theta[:, i] = theta[:, i - 1] * np.float32(scale)
    return torch.from_numpy(np.cos(theta)), torch.from_numpy(np.sin(theta))


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int
) -> torch.Tensor:
    """Rotate adjacent pairs of the first `rope_dim` features; x is (B, T, H, D)."""
    rot, rest = x[..., :rope_dim], x[..., rope_dim:]
    pairs = rot.reshape(*rot.shape[:-1], rope_dim // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).reshape(rot.shape)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    """Round x as ggml quantizes activations for a q8_0 dot product (blocks of 32 on the last dim)."""
    shape = x.shape
    blocks = x.reshape(*shape[:-1], shape[-1] // 32, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    d = amax / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv)
    return (q * _f16(d)).reshape(shape)


class LlamaTorch(nn.Module):
    """A llama model whose parameters are the GGUF's tensors, named by their GGUF names."""

    def __init__(self, params: LlamaParams, tensors: dict[str, np.ndarray], types: dict[str, str]):
        super().__init__()
        if params.rope_dim % 2 or params.n_head % params.n_head_kv:
            raise UnsupportedModel("rope dimension must be even and n_head a multiple of n_head_kv")
        self.params = params
        self.types = dict(types)
        self.weights = nn.ParameterDict(
            {
                _key(n): nn.Parameter(
                    torch.from_numpy(np.ascontiguousarray(a)), requires_grad=False
                )
                for n, a in tensors.items()
            }
        )
        self.tied = "output.weight" not in tensors
        # Adapters by GGUF weight name: each maps the linear's input to a delta of its output.
        self.adapters: dict[str, nn.Module] = {}
        self.emulate = False
        # The KV cache type llama.cpp runs with ("f16" is its default), read when emulating.
        self.kv_type = "f16"
        self._rope_cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_weights(cls, weights: GgufWeights) -> LlamaTorch:
        """Build the model from weights read by gguf_io.read_gguf."""
        return cls(weights.params, weights.tensors, weights.types)

    # -- weights ------------------------------------------------------------------------------

    def weight(self, name: str) -> nn.Parameter:
        """Return the parameter holding GGUF tensor `name`."""
        param: nn.Parameter = self.weights[_key(name)]
        return param

    def names(self) -> list[str]:
        """Return the GGUF names of every tensor."""
        return [k.replace("/", ".") for k in self.weights]

    def linear_names(self) -> list[str]:
        """Return the GGUF names of the per-layer projection weights, in layer order."""
        return [
            f"blk.{i}.{part}.weight" for i in range(self.params.n_layer) for part in LAYER_LINEARS
        ]

    def set_trainable(self, names: Iterable[str]) -> None:
        """Make exactly the tensors in `names` trainable."""
        chosen = {_key(n) for n in names}
        for key, p in self.weights.items():
            p.requires_grad_(key in chosen)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Return every tensor as a float32 numpy array under its GGUF name."""
        return {n: self.weight(n).detach().cpu().numpy().copy() for n in self.names()}

    # -- forward ------------------------------------------------------------------------------

    def _angles(self, n_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self._rope_cache
        if cache is None or cache[0] < n_pos:
            cos, sin = rope_angles(self.params, max(n_pos, 64))
            self._rope_cache = cache = (cos.shape[0], cos, sin)
        return cache[1][:n_pos], cache[2][:n_pos]

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w = self.weight(name)
        if self.emulate:
            kind = self.types.get(name, "f32")
            xin = _f16(x) if kind in ("f16", "bf16") else _q8_0(x) if kind == "q8_0" else x
        else:
            xin = x
        y = F.linear(xin, w)
        adapter = self.adapters.get(name)
        if adapter is not None:
            # llama.cpp multiplies an f32 adapter by the unrounded activations.
            y = y + adapter(x)
        return y

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        eps = self.params.rms_eps
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * self.weight(name)

    def _attention(
        self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        p = self.params
        b, t, _ = x.shape
        q = self._linear(f"blk.{i}.attn_q.weight", x).view(b, t, p.n_head, p.head_dim)
        k = self._linear(f"blk.{i}.attn_k.weight", x).view(b, t, p.n_head_kv, p.head_dim)
        v = self._linear(f"blk.{i}.attn_v.weight", x).view(b, t, p.n_head_kv, p.head_dim)
        q = apply_rope(q, cos, sin, p.rope_dim)
        k = apply_rope(k, cos, sin, p.rope_dim)
        if self.emulate and self.kv_type == "f16":
            q, k, v = _f16(q), _f16(k), _f16(v)
        group = p.n_head // p.n_head_kv
        q = q.transpose(1, 2)  # (B, H, T, D)
        k = k.transpose(1, 2).repeat_interleave(group, dim=1)
        v = v.transpose(1, 2).repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) * (1.0 / float(np.sqrt(p.head_dim)))
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
        if self.emulate and self.kv_type == "f16":
            probs = _f16(probs)
        out = (probs @ v).transpose(1, 2).reshape(b, t, p.n_embd)
        return self._linear(f"blk.{i}.attn_output.weight", out)

    def _ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        gate = self._linear(f"blk.{i}.ffn_gate.weight", x)
        up = self._linear(f"blk.{i}.ffn_up.weight", x)
        return self._linear(f"blk.{i}.ffn_down.weight", F.silu(gate) * up)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return the final normed hidden states (B, T, n_embd) for token ids (B, T)."""
        cos, sin = self._angles(tokens.shape[1])
        x = F.embedding(tokens, self.weight("token_embd.weight"))
        for i in range(self.params.n_layer):
            x = x + self._attention(i, self._norm(x, f"blk.{i}.attn_norm.weight"), cos, sin)
            x = x + self._ffn(i, self._norm(x, f"blk.{i}.ffn_norm.weight"))
        return self._norm(x, "output_norm.weight")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return logits (B, T, n_vocab) for token ids (B, T)."""
        head = "token_embd.weight" if self.tied else "output.weight"
        return self._linear(head, self.hidden(tokens))

    @torch.no_grad()
    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """Return the `n` tokens greedy decoding appends to `prompt` (full recompute per token)."""
        tokens = list(prompt)
        out: list[int] = []
        for _ in range(n):
            logits = self(torch.tensor([tokens]))[0, -1]
            nxt = int(torch.argmax(logits))
            out.append(nxt)
            tokens.append(nxt)
        return out


def load_llama(path: Any) -> LlamaTorch:
    """Read the GGUF at `path` and return its torch model (eval mode, nothing trainable)."""
    from actors.learning.gguf_io import read_gguf

    return LlamaTorch.from_weights(read_gguf(path)).eval()
