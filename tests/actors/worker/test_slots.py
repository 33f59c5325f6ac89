"""The batching engine's pure decisions: which slot a prompt takes, what one step decodes."""

from __future__ import annotations

import pytest

from actors.worker.backends.slots import (
    Choice,
    Chunk,
    SlotView,
    Wants,
    choose_slot,
    common_prefix,
    gap_fillers,
    plan_step,
)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((), (), 0),
        ((1, 2, 3), (), 0),
        ((1, 2, 3), (1, 2, 3), 3),
        ((1, 2, 3), (1, 2), 2),
        ((1, 2, 3), (1, 9, 3), 1),
        ((7,), (8,), 0),
    ],
    ids=["empty", "one-empty", "equal", "one-is-a-prefix", "differ-in-the-middle", "differ-first"],
)
def test_common_prefix_counts_the_leading_tokens_both_share(
    a: tuple[int, ...], b: tuple[int, ...], expected: int
) -> None:
    assert common_prefix(a, b) == expected
    assert common_prefix(b, a) == expected


PROMPT = (1, 10, 11, 12, 13)

CHOICES = [
    ("no-free-slot", PROMPT, [], None),
    (
        "the-only-free-slot-even-if-it-shares-nothing",
        PROMPT,
        [SlotView(2, (1, 50), 9)],
        Choice(2, 1),
    ),
    (
        "the-longest-shared-prefix-wins",
        PROMPT,
        [SlotView(0, (1, 10), 1), SlotView(1, (1, 10, 11, 12), 5), SlotView(2, (1,), 0)],
        Choice(1, 4, came_back=True),
    ),
    (
        "a-tie-goes-to-the-least-recently-used",
        PROMPT,
        [SlotView(0, (1, 10, 99), 7), SlotView(1, (1, 10, 98), 3), SlotView(2, (1, 10), 5)],
        Choice(1, 2),
    ),
    (
        "a-tie-in-age-goes-to-the-lowest-index",
        PROMPT,
        [SlotView(3, (), 0), SlotView(1, (), 0)],
        Choice(1, 0),
    ),
    (
        "a-cached-copy-of-the-whole-prompt-still-leaves-its-last-token-to-decode",
        PROMPT,
        [SlotView(0, PROMPT + (77, 78), 1)],
        Choice(0, len(PROMPT) - 1, came_back=True),
    ),
    (
        # Found through the node: interleaved chats all share "Chat " with the warm slot, so
        # each first turn evicted the last chat and no second turn found its history.
        "a-short-shared-prefix-does-not-take-a-warm-slot-from-its-conversation",
        PROMPT,
        [SlotView(0, (1, 10, 40, 41, 42, 43), 5), SlotView(1, (), 0)],
        Choice(1, 0),
    ),
    ("a-one-token-prompt-reuses-nothing", (1,), [SlotView(0, (1, 2), 1)], Choice(0, 0)),
    ("an-empty-cache-reuses-nothing", PROMPT, [SlotView(0, (), 4)], Choice(0, 0)),
    (
        "a-prompt-takes-back-the-slot-of-the-one-off-that-evicted-it",
        PROMPT,
        [SlotView(0, (7, 8, 9), 1, came_back=True), SlotView(1, (6, 6), 5, evicted=(*PROMPT, 30))],
        Choice(1, 0, came_back=True),
    ),
    (
        "not-once-a-request-came-back-for-the-one-off",
        PROMPT,
        [
            SlotView(0, (7, 8, 9), 1, came_back=True),
            SlotView(1, (6, 6), 5, came_back=True, evicted=PROMPT),
        ],
        Choice(0, 0),
    ),
    (
        # New conversations evict a stale one, not each other before their second turns.
        "a-new-prompt-evicts-the-least-recently-used-even-when-a-request-came-back-for-it",
        PROMPT,
        [SlotView(0, (7, 8, 9), 1, came_back=True), SlotView(1, (6, 6), 5, evicted=(40, 41))],
        Choice(0, 0),
    ),
    (
        "not-for-a-few-tokens-of-what-the-one-off-evicted",
        PROMPT,
        [SlotView(0, (7, 8, 9), 1, came_back=True), SlotView(1, (6, 6), 5, evicted=(1, 10, 99))],
        Choice(0, 0),
    ),
    (
        "between-two-one-offs-the-one-that-evicted-more-of-it",
        PROMPT,
        [SlotView(0, (6,), 1, evicted=(1, 10, 11)), SlotView(1, (5,), 2, evicted=PROMPT)],
        Choice(1, 0, came_back=True),
    ),
    (
        "an-emptied-slot-before-the-least-recently-used",
        PROMPT,
        [SlotView(0, (7, 8, 9), 1, came_back=True), SlotView(1, (), 9)],
        Choice(1, 0),
    ),
]


@pytest.mark.parametrize(
    ("prompt", "free", "expected"), [c[1:] for c in CHOICES], ids=[c[0] for c in CHOICES]
)
def test_a_prompt_takes_the_slot_holding_most_of_it_else_evicts_the_least_wanted(
    prompt: tuple[int, ...], free: list[SlotView], expected: Choice | None
) -> None:
    assert choose_slot(prompt, free) == expected


PLANS = [
    ("nothing-running", [], 8, []),
    (
        "every-generating-sequence-gets-one-token-listed-by-sequence",
        [Wants(0, True), Wants(3, True), Wants(1, True)],
        8,
        [Chunk(0, 1), Chunk(1, 1), Chunk(3, 1)],
    ),
    (
        "a-prompt-takes-what-the-generating-sequences-leave",
        [Wants(0, True), Wants(1, False, 100), Wants(2, True)],
        8,
        [Chunk(0, 1), Chunk(1, 6), Chunk(2, 1)],
    ),
    (
        "a-short-prompt-takes-only-what-it-needs-and-the-next-gets-the-rest",
        [Wants(4, False, 3), Wants(5, False, 10)],
        8,
        [Chunk(4, 3), Chunk(5, 5)],
    ),
    (
        "the-oldest-prompt-goes-first-and-a-later-one-waits-when-nothing-is-left",
        [Wants(2, False, 50), Wants(0, False, 5)],
        8,
        [Chunk(2, 8)],
    ),
    (
        "the-budget-goes-by-admission-order-the-chunks-by-sequence",
        [Wants(5, False, 6), Wants(1, False, 50)],
        8,
        [Chunk(1, 2), Chunk(5, 6)],
    ),
    (
        "generating-sequences-that-fill-the-budget-leave-prompts-for-the-next-step",
        [Wants(0, True), Wants(1, True), Wants(2, False, 4)],
        2,
        [Chunk(0, 1), Chunk(1, 1)],
    ),
]


@pytest.mark.parametrize(
    ("running", "budget", "expected"), [p[1:] for p in PLANS], ids=[p[0] for p in PLANS]
)
def test_a_step_decodes_every_next_token_then_prompt_chunks_within_the_budget(
    running: list[Wants], budget: int, expected: list[Chunk]
) -> None:
    plan = plan_step(running, budget)
    assert plan == expected
    assert sum(c.n_tokens for c in plan) <= budget


def test_a_budget_smaller_than_the_generating_sequences_is_refused() -> None:
    with pytest.raises(ValueError, match="exceed the budget"):
        plan_step([Wants(0, True), Wants(1, True)], 1)


def test_a_conversation_and_a_repeated_probe_settle_in_slots_of_their_own() -> None:
    # Found by review: when a taken-back slot counted as a fresh eviction, the probe then took
    # it back in turn, and the two evicted each other from one slot forever while the other
    # slot's conversation sat unused.
    a, b, probe = (1, 10, 11, 12), (2, 20, 21, 22), (3, 30, 31, 32)
    slots = [SlotView(0, a, 3, True), SlotView(1, b, 4, True)]
    clock = 5
    for prompt in (probe, a, probe, a, probe, a):
        choice = choose_slot(prompt, slots)
        assert choice is not None
        old = slots[choice.index]
        slots[choice.index] = SlotView(
            old.index, prompt, clock, 0, choice.came_back, () if choice.came_back else old.cached
        )
        clock += 1
    # The probe evicted the least recently used conversation once (a took its slot back from
    # it); from then on each of a and the probe finds its own cache.
    assert {s.cached for s in slots} == {a, probe}
    assert all(s.came_back for s in slots)


def test_a_slot_that_kept_the_logits_after_exactly_the_prompt_reuses_all_of_it() -> None:
    kept = SlotView(0, (*PROMPT, 20, 21), last_used=1, logits_at=len(PROMPT))
    assert choose_slot(PROMPT, [kept]) == Choice(index=0, reused=len(PROMPT), came_back=True)


@pytest.mark.parametrize(
    ("cached", "logits_at"),
    [
        ((*PROMPT, 20), 0),  # no logits kept
        ((*PROMPT, 20), len(PROMPT) + 1),  # logits after a longer prompt
        ((*PROMPT[:-1], 99, 20), len(PROMPT)),  # logits after another prompt of that length
    ],
    ids=["none-kept", "kept-after-a-longer-prompt", "kept-after-another-prompt"],
)
def test_without_the_logits_of_exactly_the_prompt_its_last_token_is_decoded_again(
    cached: tuple[int, ...], logits_at: int
) -> None:
    slot = SlotView(0, cached, last_used=1, logits_at=logits_at)
    reused = min(len(PROMPT) - 1, common_prefix(PROMPT, cached))
    assert choose_slot(PROMPT, [slot]) == Choice(index=0, reused=reused, came_back=True)


FILLERS = [
    ("nothing-planned", set(), {0, 1, 2}, 8, []),
    ("a-run-needs-none", {2, 3, 4}, {0, 1, 5}, 8, []),
    ("every-gap-filled-by-an-open-slot", {0, 2, 4, 6}, {1, 3, 5, 7}, 8, [1, 3, 5]),
    ("only-between-the-lowest-and-highest", {3, 5}, {0, 1, 4, 6, 7}, 8, [4]),
    ("a-slot-that-cannot-take-a-token-stays-a-gap", {0, 3}, {2}, 8, [2]),
    ("at-most-the-batchs-room-lowest-first", {0, 7}, {1, 2, 3, 4, 5, 6}, 2, [1, 2]),
    ("no-room-no-fillers", {0, 2}, {1}, 0, []),
]


@pytest.mark.parametrize(
    ("planned", "open_", "spare", "expected"), [f[1:] for f in FILLERS], ids=[f[0] for f in FILLERS]
)
def test_gaps_between_the_steps_sequences_are_filled_by_open_slots_within_the_room(
    planned: set[int], open_: set[int], spare: int, expected: list[int]
) -> None:
    assert gap_fillers(planned, open_, spare) == expected
