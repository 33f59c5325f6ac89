"""Reuse llama.cpp sampler chains across requests instead of building one per request.

`Llama.generate` builds a fresh sampler chain for every call (`Llama._init_sampler`): eight
native allocations, ctypes wrappers and an ExitStack, about half of a one-token request's time
in the backend (py-spy and cProfile, tiny model, prompt already in the KV cache). A chain built
with the same parameters and seed and then reset (`llama_sampler_reset`: the penalty history is
cleared, the dist sampler's generator re-seeded) samples exactly as a new one would; tests
compare the texts with and without this cache.

A chain that leaves the cache is closed at once. llama-cpp-python's `LlamaSampler` is a
reference cycle (its ExitStack's callback holds the object), so a dropped one frees its native
chain (10-15 KiB, mostly the dist sampler's state) only when Python's cyclic collector reaches
it, and the chains that outlive a young collection wait for a full one: on the tiny model about
once per 100,000 requests. A chain built per request (a cache miss: a new seed or temperature;
before this cache, every request) so grew the heap by megabytes between full collections, and
glibc kept the high-water mark: the worker's creep in the soak. Closing empties the ExitStack,
which breaks the cycle, so reference counting frees the rest too.

The cache stands in for the Llama object's `_init_sampler` (an instance attribute shadows the
method, which `generate` calls with keywords only). Chains with a grammar or logits processors
hold per-request state of their own and are always built anew (the backend passes neither).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class SamplerCache:
    """The recently used sampler chains of one Llama object, keyed by parameters and seed."""

    def __init__(self, llm: Any, size: int = 8) -> None:
        if size < 1:
            raise ValueError(f"a sampler cache holds at least one chain, not {size}")
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
                # The oldest is not the chain just built; the Llama object may still point at
                # it (the previous request's), but `generate` replaces it before sampling.
                self._chains.popitem(last=False)[1].close()
        else:
            chain.reset()
            self._chains.move_to_end(key)
        return chain

    def __len__(self) -> int:
        return len(self._chains)

    def close(self) -> None:
        """Free every cached chain now (before the model goes)."""
        self._llm._sampler = None  # it points at one of them: never sample from a freed chain
        while self._chains:
            self._chains.popitem()[1].close()
