"""Reuse llama.cpp sampler chains across requests instead of building one per request.

`Llama.generate` builds a fresh sampler chain for every call (`Llama._init_sampler`): eight
native allocations, ctypes wrappers and an ExitStack, about half of a one-token request's time
in the backend (py-spy and cProfile, tiny model, prompt already in the KV cache). A chain built
with the same parameters and seed and then reset (`llama_sampler_reset`: the penalty history is
cleared, the dist sampler's generator re-seeded) samples exactly as a new one would; tests
compare the texts with and without this cache.

The cache stands in for the Llama object's `_init_sampler` (an instance attribute shadows the
method, which `generate` calls with keywords only). Chains with a grammar or logits processors
hold per-request state of their own and are always built anew.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class SamplerCache:
    """The recently used sampler chains of one Llama object, keyed by parameters and seed."""

    def __init__(self, llm: Any, size: int = 8) -> None:
        self._llm = llm
        self._build = llm._init_sampler  # the bound method of the class
        self._size = size
        self._chains: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self.built = 0  # chains built so far (for tests)

    def install(self) -> SamplerCache:
        """Make the Llama object take its chains from this cache; return the cache."""
        self._llm._init_sampler = self
        return self

    def __call__(self, **params: Any) -> Any:
        """Return a chain for `params` in its initial state (what `_init_sampler` returns)."""
        if params.get("grammar") is not None or params.get("logits_processor") is not None:
            self.built += 1
            return self._build(**params)
        key = (self._llm._seed, *sorted(params.items()))
        chain = self._chains.get(key)
        if chain is None:
            self.built += 1
            chain = self._chains[key] = self._build(**params)
            if len(self._chains) > self._size:
                self._chains.popitem(last=False)  # freed when the Llama object lets go of it
        else:
            chain.reset()
            self._chains.move_to_end(key)
        return chain
