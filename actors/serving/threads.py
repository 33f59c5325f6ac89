"""How the CPU's threads are shared among the models it holds (pure).

llama.cpp decodes fastest with one thread per physical core, and far slower with more threads
than cores: its spinning threads preempt each other (backends/threads.py). Two models on the
CPU that each took every core would decode, when both are busy, at well under half their
speed. So the CPU device has a budget (`[resources] cpu_threads`, default the physical cores)
and each model held there gets a share: a catalog entry's own `threads` as set (at most the
budget), the others an even split of what those leave, at least one each. The manager
recomputes the shares whenever a model comes or goes on the CPU and tells the workers whose
share changed.
"""

from __future__ import annotations

from collections.abc import Mapping


def thread_shares(budget: int, wanted: Mapping[str, int]) -> dict[str, int]:
    """Split `budget` threads among the models in `wanted` (name -> its own setting, 0: none).

    A model with a setting gets it, capped at the budget; the rest share what those leave
    evenly (the first in order get the remainder), never less than one thread each.
    """
    if budget < 1:
        raise ValueError(f"a thread budget is at least 1, not {budget}")
    fixed = {name: min(n, budget) for name, n in wanted.items() if n > 0}
    shared = [name for name, n in wanted.items() if n <= 0]
    left = max(budget - sum(fixed.values()), 0)
    shares = dict(fixed)
    for i, name in enumerate(shared):
        even, extra = divmod(left, len(shared))
        shares[name] = max(1, even + (1 if i < extra else 0))
    return shares


__all__ = ["thread_shares"]
