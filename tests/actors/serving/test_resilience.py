from __future__ import annotations

import asyncio

import pytest

from actors.errors import Overloaded
from actors.serving.config import BulkheadConfig, CircuitBreakerConfig
from actors.serving.resilience import Bulkhead, CircuitBreaker


def test_the_breaker_opens_after_the_threshold_and_half_opens_after_the_timeout() -> None:
    breaker = CircuitBreaker(CircuitBreakerConfig(failure_threshold=3, reset_timeout=20))
    for t in range(2):
        breaker.record_failure(now=float(t))
        assert breaker.state(now=float(t)) == "closed"
    breaker.record_failure(now=2.0)
    assert breaker.state(now=2.0) == "open"
    assert not breaker.allow(now=10.0)
    assert breaker.retry_after(now=10.0) == 12.0
    assert breaker.state(now=22.0) == "half_open"
    assert breaker.allow(now=22.0)
    assert not breaker.allow(now=22.5)  # one trial at a time


def test_a_failed_trial_reopens_the_breaker_and_a_good_one_closes_it() -> None:
    breaker = CircuitBreaker(CircuitBreakerConfig(failure_threshold=1, reset_timeout=5))
    breaker.record_failure(now=0.0)
    assert breaker.allow(now=5.0)
    breaker.record_failure(now=5.0)
    assert breaker.state(now=6.0) == "open"
    assert breaker.allow(now=10.0)
    breaker.record_success()
    assert breaker.state(now=10.0) == "closed"
    assert breaker.allow(now=10.0)


def test_a_success_resets_the_count_of_consecutive_failures() -> None:
    breaker = CircuitBreaker(CircuitBreakerConfig(failure_threshold=2, reset_timeout=5))
    breaker.record_failure(now=0.0)
    breaker.record_success()
    breaker.record_failure(now=1.0)
    assert breaker.state(now=1.0) == "closed"


async def test_a_full_bulkhead_refuses_at_once_and_frees_its_places() -> None:
    bulkhead = Bulkhead(BulkheadConfig(max_concurrent=1, max_queue_size=1), "m")
    release = asyncio.Event()
    entered = asyncio.Event()

    async def hold() -> None:
        async with bulkhead.slot():
            entered.set()
            await release.wait()

    first = asyncio.create_task(hold())
    await entered.wait()
    second = asyncio.create_task(hold())  # waits for the one slot
    await asyncio.sleep(0)
    assert (bulkhead.active, bulkhead.waiting) == (1, 1)
    with pytest.raises(Overloaded) as refused:
        async with bulkhead.slot():
            pass
    assert refused.value.retry_after > 0
    release.set()
    await asyncio.gather(first, second)
    assert bulkhead.occupancy == 0


async def test_a_cancelled_waiter_gives_its_place_back() -> None:
    bulkhead = Bulkhead(BulkheadConfig(max_concurrent=1, max_queue_size=1), "m")
    async with bulkhead.slot():
        waiter = asyncio.create_task(bulkhead.slot().__aenter__())
        await asyncio.sleep(0)
        assert bulkhead.waiting == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert bulkhead.waiting == 0
    assert bulkhead.occupancy == 0


def _sample(name: str, model: str) -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, {"model": model})


def test_the_breaker_gauge_and_failure_count_follow_every_transition() -> None:
    model = "gauge-follows-breaker"
    breaker = CircuitBreaker(CircuitBreakerConfig(failure_threshold=1, reset_timeout=5), model)
    assert _sample("moc_circuit_breaker_state", model) == 0
    breaker.record_failure(now=0.0)
    assert _sample("moc_circuit_breaker_state", model) == 1
    assert _sample("moc_circuit_breaker_failures_total", model) == 1
    assert breaker.allow(now=5.0)
    assert _sample("moc_circuit_breaker_state", model) == 2
    breaker.record_success()
    assert _sample("moc_circuit_breaker_state", model) == 0
    # A model loaded again gets a new breaker: its gauge starts closed whatever the old one said.
    breaker.record_failure(now=6.0)
    CircuitBreaker(CircuitBreakerConfig(), model)
    assert _sample("moc_circuit_breaker_state", model) == 0


async def test_the_bulkhead_gauges_count_active_and_queued_requests() -> None:
    model = "gauge-follows-bulkhead"
    bulkhead = Bulkhead(BulkheadConfig(max_concurrent=1, max_queue_size=1), model)
    admitted, done = asyncio.Event(), asyncio.Event()

    async def second() -> None:
        async with bulkhead.slot():
            admitted.set()
            await done.wait()

    async with bulkhead.slot():
        assert _sample("moc_bulkhead_active_requests", model) == 1
        task = asyncio.create_task(second())
        await asyncio.sleep(0)  # one loop turn: the second request queues behind the first
        assert _sample("moc_bulkhead_queued_requests", model) == 1
        with pytest.raises(Overloaded):
            async with bulkhead.slot():
                pass
        assert _sample("moc_bulkhead_rejected_total", model) == 1
    await admitted.wait()
    assert _sample("moc_bulkhead_active_requests", model) == 1
    assert _sample("moc_bulkhead_queued_requests", model) == 0
    done.set()
    await task
    assert _sample("moc_bulkhead_active_requests", model) == 0
