"""Paging of list replies: `limit`/`offset` checked (ints, or digits from a query string), and
one page cut with the fields that say where the next starts, legacy key kept."""

from __future__ import annotations

from typing import Any

import pytest

from actors.errors import InvalidRequest
from transports.dispatch import paged
from transports.schema import PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX, Page, parse_page


@pytest.mark.parametrize(
    ("payload", "page"),
    [
        ({}, Page(PAGE_LIMIT_DEFAULT, 0)),
        ({"limit": 1}, Page(1, 0)),
        ({"limit": PAGE_LIMIT_MAX, "offset": 5}, Page(PAGE_LIMIT_MAX, 5)),
        ({"limit": "20", "offset": "40"}, Page(20, 40)),
        ({"limit": None, "offset": None}, Page(PAGE_LIMIT_DEFAULT, 0)),
    ],
    ids=["defaults", "one", "max", "query-strings", "nulls"],
)
def test_a_good_page_request_is_read(payload: dict[str, Any], page: Page) -> None:
    assert parse_page(payload) == page


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": PAGE_LIMIT_MAX + 1}, "limit"),
        ({"limit": True}, "limit"),
        ({"limit": 2.0}, "limit"),
        ({"limit": "1e3"}, "limit"),
        ({"limit": "١٢"}, "limit"),  # Arabic-Indic digits: int() takes them, we do not
        ({"limit": "+5"}, "limit"),
        ({"offset": -1}, "offset"),
        ({"offset": "9" * 12}, "offset"),
        ({"offset": [1]}, "offset"),
    ],
    ids=["zero", "past-max", "bool", "float", "exponent", "non-ascii", "sign", "negative",
         "huge", "list"],
)
def test_a_bad_page_request_is_refused_naming_the_field(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_page(payload)
    assert refused.value.field == field


def test_a_page_keeps_the_legacy_key_and_says_where_the_next_one_starts() -> None:
    # The window is what the store read from the offset on: one more than the page if any.
    assert paged("jobs", [0, 1, 2], Page(2, 0)) == {
        "jobs": [0, 1], "limit": 2, "offset": 0, "next_offset": 2
    }
    assert paged("jobs", [4], Page(2, 4)) == {
        "jobs": [4], "limit": 2, "offset": 4, "next_offset": None
    }
    assert paged("jobs", [], Page(10, 9))["next_offset"] is None
    assert paged("jobs", [5, 6], Page(2, 5))["next_offset"] is None  # exactly a page left
