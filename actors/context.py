"""How long a context a load may ask for: at most what the model was trained for.

A client chooses `n_ctx`, and the memory estimate (and so the ledger's claim) grows with it: the
KV cache linearly, the attention scores of one micro-batch at a full context too (14,599 MiB
for a 0.4 MiB model at n_ctx 1,048,576). Past the model's trained context a longer context buys
nothing but that claim, so it is refused (400, naming n_ctx) rather than quietly clamped: the
client learns the limit instead of getting a context shorter than it asked for. A catalog entry
may allow more (`n_ctx_max`, for models that extend their context with RoPE scaling).
"""

from __future__ import annotations

from actors.errors import InvalidRequest
from actors.estimate import GgufHeader, read_gguf_header


def trained_context(header: GgufHeader) -> int | None:
    """Return the context the model was trained for (`<arch>.context_length`), if it says."""
    meta = header.metadata
    arch = str(meta.get("general.architecture", "llama"))
    value = meta.get(f"{arch}.context_length")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


def check_n_ctx(n_ctx: int, trained: int | None, n_ctx_max: int = 0) -> None:
    """Refuse (InvalidRequest naming n_ctx) a context longer than `n_ctx_max`, or, when that is
    0, than the trained context; a model that does not say is bounded by `n_ctx_max` alone."""
    limit = n_ctx_max or trained
    if limit is None or n_ctx <= limit:
        return
    if n_ctx_max:
        why = f"this model's catalog entry allows at most {n_ctx_max} (n_ctx_max)"
    else:
        why = (
            f"the model was trained for {trained} tokens (a catalog entry's n_ctx_max may "
            "allow more)"
        )
    raise InvalidRequest("n_ctx", f"{n_ctx} is too long: {why}")


def check_gguf_context(path: str, n_ctx: int, n_ctx_max: int = 0) -> None:
    """Read the GGUF header at `path` and apply `check_n_ctx` to its trained context."""
    check_n_ctx(n_ctx, trained_context(read_gguf_header(path)), n_ctx_max)
