"""What one measurement of a worker calls for: nothing, a growth report, or a kill."""

from __future__ import annotations

import pytest

from actors.serving.memory_watch import MemoryVerdict, judge_memory, model_mb


@pytest.mark.parametrize(
    ("process_mb", "offset_mb", "reported_mb", "limit_mb", "verdict"),
    [
        (60.0, 50.0, 10.0, 0.0, MemoryVerdict()),
        (60.1, 50.0, 10.0, 0.0, MemoryVerdict()),  # under 2 % more: not worth a message
        (90.0, 50.0, 10.0, 0.0, MemoryVerdict(grown_mb=40.0)),
        (40.0, 50.0, 10.0, 0.0, MemoryVerdict()),  # shrank (pages returned): the claim stays
        (90.0, 50.0, 10.0, 90.0, MemoryVerdict(grown_mb=40.0)),  # at the limit is allowed
        (90.5, 50.0, 10.0, 90.0, MemoryVerdict(kill=True)),
        (8_600.0, 50.0, 8_700.0, 4_096.0, MemoryVerdict(kill=True)),  # reported or not
    ],
    ids=["unchanged", "grew-a-little", "grew", "shrank", "at-the-limit", "past-the-limit",
         "past-the-limit-already-reported"],
)  # fmt: skip
def test_a_measurement_is_judged_against_the_last_report_and_the_limit(
    process_mb: float, offset_mb: float, reported_mb: float, limit_mb: float, verdict: MemoryVerdict
) -> None:
    assert judge_memory(process_mb, offset_mb, reported_mb, limit_mb) == verdict


def test_the_models_share_is_what_the_process_holds_beyond_the_bare_worker() -> None:
    assert model_mb(130.0, 48.5) == 81.5
    assert model_mb(40.0, 48.5) == 0.0
