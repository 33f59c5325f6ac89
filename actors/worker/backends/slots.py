"""Pure decisions of the batching engine: which slot a prompt takes, what one step decodes.

No llama.cpp here: the engine (gguf_engine.py) asks these functions and does the I/O. A slot is
one sequence of the shared llama.cpp context; its cache is the tokens whose KV it holds.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SlotView:
    """What slot choice needs to know of one free slot."""

    index: int
    cached: Sequence[int]  # the tokens whose KV this slot's sequence holds, in order
    last_used: int  # when it last took a request (any increasing count); 0: never
    logits_at: int = 0  # the slot kept the logits after cached[:logits_at]; 0: none
    # A request came back for the prompt it holds: it was taken for its cache, or taken back
    # (below) since that prompt took it.
    came_back: bool = False
    evicted: Sequence[int] = ()  # the cache that prompt evicted from it; (): none


@dataclass(frozen=True, slots=True)
class Choice:
    """The slot a prompt takes, how many of its leading tokens are already in its KV, and
    whether the prompt came back to it (taken for its cache, or taken back) rather than
    evicting it."""

    index: int
    reused: int
    came_back: bool = False


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Return the length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    head_a, head_b = a[:n], b[:n]
    if type(head_a) is type(head_b) and head_a == head_b:  # the usual case, compared in C
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


SIMILARITY = 0.5
"""A slot is taken for its cache only when it already holds at least this share of the prompt
(llama.cpp server's `--slot-prompt-similarity`, 0.5): otherwise a prompt that shares a few
leading tokens with everything (a chat template's header, "Chat 3.") would take the warmest
slot and evict the conversation it holds, and every interleaved chat would re-decode its
history."""


def choose_slot(prompt: Sequence[int], free: Sequence[SlotView]) -> Choice | None:
    """Pick the free slot for `prompt`; None if none is free.

    The slot sharing the longest prefix with `prompt` wins when that prefix is at least
    SIMILARITY of the prompt (ties: least recently used, then lowest index). Otherwise, when the
    prompt comes back to a cache that a one-off evicted (a prompt no request has come back for
    since: a warm-up, a probe), it takes that slot back: taking the least recently used one
    instead evicts a third conversation, which does the same when it returns (after one warm-up
    request, most of a round of 8 streams re-decoded their prompts). Otherwise an empty slot,
    else the least recently used one, whose cache is the least likely to be wanted again.
    (Evicting one-offs first whatever their age fails the other way: each new conversation's
    first turn evicts the one before, which never got the chance to come back.) At most
    len(prompt) - 1 tokens are reused (the last prompt token must be decoded again to get the
    logits of the first generated token), unless the slot kept the logits after exactly this
    prompt: then all of it is, and nothing is decoded.
    """
    if not free:
        return None
    cap = max(len(prompt) - 1, 0)

    def reuse(slot: SlotView) -> int:
        shared = common_prefix(prompt, slot.cached)
        if shared == len(prompt) == slot.logits_at > 0:
            return shared
        return min(shared, cap)

    reused = {slot.index: reuse(slot) for slot in free}
    best = min(free, key=lambda s: (-reused[s.index], s.last_used, s.index))
    shared = reused[best.index]
    if shared > 0 and shared >= SIMILARITY * len(prompt):
        return Choice(index=best.index, reused=shared, came_back=True)
    lost = {s.index: common_prefix(prompt, s.evicted) for s in free if not s.came_back}
    back = max(lost, key=lambda i: (lost[i], -i), default=None)
    if back is not None and lost[back] > 0 and lost[back] >= SIMILARITY * len(prompt):
        return Choice(index=back, reused=reused[back], came_back=True)
    evicted = min(free, key=lambda s: (bool(s.cached), s.last_used, s.index))
    return Choice(index=evicted.index, reused=reused[evicted.index])


@dataclass(frozen=True, slots=True)
class Wants:
    """One running sequence as the step planner sees it."""

    seq: int  # its sequence id (its slot)
    generating: bool  # True: it has a sampled token to decode; False: its prompt is unfinished
    prompt_left: int = 0  # prompt tokens not yet decoded (prefilling sequences only)


@dataclass(frozen=True, slots=True)
class Chunk:
    """Tokens one sequence decodes in this step: one for a generating sequence, else a chunk."""

    seq: int
    n_tokens: int


def plan_step(running: Sequence[Wants], budget: int) -> list[Chunk]:
    """Plan one decode: every generating sequence's next token, then prompt chunks in order.

    Generating sequences always get their token (so running streams never stall behind a long
    prompt); the rest of `budget` (tokens per step) goes to unfinished prompts in the order given
    (admission order, so the oldest prompt finishes first). The chunks come back by sequence id,
    the order a batch must list them in to be decoded in one piece (see `gap_fillers`). A budget
    smaller than the number of generating sequences is a caller's bug: the engine keeps
    budget >= slots.
    """
    generating = [w for w in running if w.generating]
    if len(generating) > budget:
        raise ValueError(f"{len(generating)} generating sequences exceed the budget of {budget}")
    plan = [Chunk(w.seq, 1) for w in generating]
    left = budget - len(plan)
    for w in running:
        if w.generating or w.prompt_left <= 0 or left <= 0:
            continue
        take = min(w.prompt_left, left)
        plan.append(Chunk(w.seq, take))
        left -= take
    return sorted(plan, key=lambda c: c.seq)


def gap_fillers(planned: Collection[int], open_: Collection[int], spare: int) -> list[int]:
    """Return the sequences that get a throwaway token so that the step's sequences form a run.

    With a KV stream per slot, llama.cpp decodes a batch in one pass only over consecutive
    sequence ids listed in order; each gap starts another whole pass over the weights (4
    sequences in slots 0, 2, 4, 6: 28 ms a step against 12 ms in slots 0 to 3, medium50m on 2
    cores). One more row in a pass costs far less, so every gap between the lowest and highest
    planned sequence is filled by a sequence in `open_` (free to take a token whose KV the engine
    removes after the decode), lowest first, at most `spare` of them (the batch's room).
    """
    if not planned:
        return []
    gaps = [s for s in range(min(planned) + 1, max(planned)) if s not in planned and s in open_]
    return gaps[: max(spare, 0)]
