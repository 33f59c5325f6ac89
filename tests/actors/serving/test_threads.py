"""Sharing the CPU's threads among the models it holds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.serving.threads import thread_shares


def test_one_model_takes_the_whole_budget() -> None:
    assert thread_shares(8, {"a": 0}) == {"a": 8}


def test_models_without_a_setting_split_the_budget_evenly_the_first_taking_the_remainder() -> None:
    assert thread_shares(8, {"a": 0, "b": 0, "c": 0}) == {"a": 3, "b": 3, "c": 2}


def test_a_models_own_setting_is_kept_and_the_others_share_what_it_leaves() -> None:
    assert thread_shares(16, {"big": 12, "a": 0, "b": 0}) == {"big": 12, "a": 2, "b": 2}


def test_a_setting_above_the_budget_is_capped_and_every_model_keeps_at_least_one_thread() -> None:
    assert thread_shares(4, {"big": 32, "a": 0}) == {"big": 4, "a": 1}


def test_more_models_than_threads_each_get_one() -> None:
    assert thread_shares(2, {"a": 0, "b": 0, "c": 0}) == {"a": 1, "b": 1, "c": 1}


def test_a_budget_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        thread_shares(0, {"a": 0})


@given(st.integers(1, 64), st.dictionaries(st.text(min_size=1), st.integers(0, 80), max_size=12))
def test_the_shared_models_never_exceed_the_budget_unless_each_has_only_one_thread(
    budget: int, wanted: dict[str, int]
) -> None:
    shares = thread_shares(budget, wanted)
    assert shares.keys() == wanted.keys()
    assert all(1 <= n <= budget for n in shares.values())
    fixed = sum(min(n, budget) for n in wanted.values() if n > 0)
    auto = [shares[name] for name, n in wanted.items() if n == 0]
    if fixed + len(auto) <= budget:
        assert fixed + sum(auto) == (budget if auto else fixed)
    else:
        assert all(n == 1 for n in auto)
