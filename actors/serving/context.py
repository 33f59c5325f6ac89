"""How long a context a load may ask for: at most what the model was trained for.

A client chooses `n_ctx`, and the memory estimate (and so the ledger's claim) grows with it: the
KV cache linearly, the attention scores of one micro-batch at a full context too (14,599 MiB
for a 0.4 MiB model at n_ctx 1,048,576). Past the model's trained context a longer context buys
nothing but that claim. A client that asks for more (a load request's n_ctx) is refused (400,
naming n_ctx) rather than quietly given less: it learns the limit. A catalog's n_ctx, which may
be the 2048 default on a model trained for less, is capped instead (the manager logs it), so a
default never makes a model unloadable. A catalog entry may allow more (`n_ctx_max`, for
models that extend their context with RoPE scaling).
"""

from __future__ import annotations

from actors.errors import InvalidRequest
from actors.serving.estimate import GgufHeader, read_gguf_header


def trained_context(header: GgufHeader) -> int | None:
    """Return the context the model was trained for (`<arch>.context_length`), if it says."""
    meta = header.metadata
    arch = str(meta.get("general.architecture", "llama"))
    value = meta.get(f"{arch}.context_length")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


def fit_n_ctx(n_ctx: int, trained: int | None, n_ctx_max: int = 0, *, asked: bool) -> int:
    """Return the context to load with: `n_ctx` when within the limit (`n_ctx_max`, or, when
    that is 0, the trained context). Past it, a client's explicit ask (`asked`) is refused
    (InvalidRequest naming n_ctx) and a catalog's n_ctx (its default included) is capped."""
    limit = n_ctx_max or trained
    if limit is None or n_ctx <= limit:
        return n_ctx
    if not asked:
        return limit
    if n_ctx_max:
        why = f"this model's catalog entry allows at most {n_ctx_max} (n_ctx_max)"
    else:
        why = (
            f"the model was trained for {trained} tokens (a catalog entry's n_ctx_max may "
            "allow more)"
        )
    raise InvalidRequest("n_ctx", f"{n_ctx} is too long: {why}")


def fit_gguf_n_ctx(path: str, n_ctx: int, n_ctx_max: int = 0, *, asked: bool) -> int:
    """Read the GGUF header at `path` and apply `fit_n_ctx` with its trained context."""
    return fit_n_ctx(n_ctx, trained_context(read_gguf_header(path)), n_ctx_max, asked=asked)
