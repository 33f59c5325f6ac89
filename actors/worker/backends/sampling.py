"""How a GGUF request samples: the llama.cpp sampler chain built from its parameters.

Pure construction over llama.cpp's low-level API (`lib` is `llama_cpp.llama_cpp`): the engine
builds one chain per admitted request and frees it when the request ends.
"""

from __future__ import annotations

from typing import Any

from actors.types import GenerationParams

TOP_K = 40  # Llama.create_completion's sampler defaults that the wire does not carry
MIN_P = 0.05


def sampler_chain(lib: Any, vocab: Any, params: GenerationParams, seed: int) -> Any:
    """Return a new chain for `params` (the caller frees it with `llama_sampler_free`).

    Greedy at temperature 0; else `Llama.generate`'s chain: top-k, top-p, min-p, temperature,
    then a draw seeded with `params.seed`, or `seed` when the request names none. Below 0 it
    draws from the raw logits.
    """
    del vocab  # for the samplers that need it (grammar, logit bias)
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    draw_seed = (seed if params.seed is None else params.seed) & 0xFFFFFFFF
    if params.temperature == 0.0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        return chain
    if params.temperature > 0.0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(TOP_K))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(MIN_P, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(params.temperature))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(draw_seed))
    return chain
