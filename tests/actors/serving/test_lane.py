"""The lane: requests from the event loop to a model's worker, behind its breaker.

A fake worker (tests/actors/serving/fake_worker.py) and a fake clock: no process, no real time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from actors.bridge import CallbackFuture
from actors.errors import CircuitOpen, WorkerCrashed
from actors.serving.config import CircuitBreakerConfig
from actors.serving.lane import LaneClosed, ModelLane
from actors.serving.resilience import CircuitBreaker
from actors.types import GenerationParams, InferRequest
from actors.worker.handle import WorkerSpec
from actors.worker.protocol import LoadSpec
from tests.actors.serving.fake_worker import FakeWorker, FakeWorkers
from tests.support import FakeClock, wait_for

REQ = InferRequest(model="m", prompt="hi", params=GenerationParams(max_tokens=3))
SPEC = WorkerSpec(name="m", load=LoadSpec(backend="gguf", path="/m.gguf"))


class Events:
    """What the lane tells the manager."""

    def __init__(self) -> None:
        self.used = 0
        self.memory: list[float] = []

    def model_used(self, name: str) -> None:
        self.used += 1

    def model_memory(self, name: str, mb: float) -> None:
        self.memory.append(mb)


class Rig:
    """A lane over fake workers; the restart it is bound to starts the next fake worker."""

    def __init__(
        self, threshold: int = 1, reset_s: float = 10.0, *, name: str = "m", slots: int = 1
    ) -> None:
        self.clock = FakeClock()
        self.events = Events()
        self.workers = FakeWorkers(measured_mb=100.0)
        self.breaker = CircuitBreaker(
            CircuitBreakerConfig(failure_threshold=threshold, reset_timeout=reset_s)
        )
        self.lane = ModelLane(
            name, events=self.events, breaker=self.breaker, clock=self.clock, slots=slots
        )
        self.lane.bind(self.restart)
        self.restarts = 0
        self.start_worker()

    def start_worker(self) -> FakeWorker:
        worker = self.workers(SPEC, Path("/run"))
        loaded = worker.start()
        self.lane.attach(worker, loaded.measured_mb)
        return worker

    def restart(self) -> CallbackFuture[bool]:
        self.restarts += 1
        self.start_worker()
        answer: CallbackFuture[bool] = CallbackFuture()
        answer.set(True)
        return answer

    @property
    def worker(self) -> FakeWorker:
        return self.workers.made[-1]


async def test_a_request_is_served_by_the_worker_and_counts_as_use() -> None:
    rig = Rig()
    result = await rig.lane.infer(REQ)
    assert (result.text, result.tokens_generated) == ("ok", 3)
    assert rig.worker.served == 1 and rig.events.used == 1


async def test_use_is_reported_at_most_every_half_second_of_the_lanes_clock() -> None:
    rig = Rig()
    for _ in range(3):
        await rig.lane.infer(REQ)
    assert rig.events.used == 1
    rig.clock.advance(0.5)
    await rig.lane.infer(REQ)
    assert rig.events.used == 2


async def test_one_worker_death_fails_every_request_in_flight_and_counts_as_one_failure() -> None:
    rig = Rig(threshold=2)
    rig.workers.hold.set()
    requests = [asyncio.ensure_future(rig.lane.infer(REQ)) for _ in range(3)]
    await wait_for(lambda: len(rig.workers.waiting) == 3, 5, "three requests at the worker")
    first = rig.worker
    first.crash()
    results = await asyncio.gather(*requests, return_exceptions=True)
    assert all(isinstance(r, WorkerCrashed) and "signal 11" in str(r) for r in results)
    assert rig.breaker.state(rig.clock()) == "closed"  # one death, one failure of two allowed
    assert rig.restarts == 1 and rig.worker is not first and rig.worker.alive


async def test_a_crash_opens_the_breaker_which_refuses_until_its_reset_then_a_trial_closes_it() -> None:
    rig = Rig(threshold=1, reset_s=10.0)
    rig.workers.hold.set()
    request = asyncio.ensure_future(rig.lane.infer(REQ))
    await wait_for(lambda: len(rig.workers.waiting) == 1, 5, "the request at the worker")
    rig.worker.crash()
    with pytest.raises(WorkerCrashed):
        await request
    rig.workers.release()
    with pytest.raises(CircuitOpen) as refused:
        await rig.lane.infer(REQ)
    assert refused.value.retry_after == 10.0
    rig.clock.advance(10.0)
    assert (await rig.lane.infer(REQ)).text == "ok"  # the trial, on the fresh worker
    assert rig.breaker.state(rig.clock()) == "closed"


async def test_a_worker_killed_for_its_memory_fails_its_requests_with_the_reason() -> None:
    rig = Rig()
    rig.workers.hold.set()
    request = asyncio.ensure_future(rig.lane.infer(REQ))
    await wait_for(lambda: len(rig.workers.waiting) == 1, 5, "the request at the worker")
    rig.lane.note_killed(rig.worker, "killed: over the per-worker memory limit")
    rig.worker.kill()
    with pytest.raises(WorkerCrashed, match="^killed: over the per-worker memory limit$"):
        await request


async def test_a_worker_that_grew_raises_the_models_memory_once_it_grew_past_two_percent() -> None:
    rig = Rig()
    rig.workers.peak_after_request = 101.0  # 1 %: not worth a message
    await rig.lane.infer(REQ)
    rig.workers.peak_after_request = 150.0
    await rig.lane.infer(REQ)
    await rig.lane.infer(REQ)  # no further growth: no further report
    assert rig.events.memory == [150.0]


async def test_a_closing_lane_refuses_new_requests_and_waits_for_the_running_ones() -> None:
    rig = Rig()
    rig.workers.hold.set()
    running = asyncio.ensure_future(rig.lane.infer(REQ))
    await wait_for(lambda: len(rig.workers.waiting) == 1, 5, "the request at the worker")
    loop = asyncio.get_running_loop()
    closing = loop.run_in_executor(None, rig.lane.close, 5.0)  # the actor's thread waits
    await wait_for(lambda: rig.lane.closing, 5, "the lane to close")
    with pytest.raises(LaneClosed):
        await rig.lane.infer(REQ)
    assert not closing.done()
    rig.workers.release()
    assert (await running).text == "ok"
    assert await closing is True


async def test_a_closed_lane_with_a_request_stuck_reports_it_after_the_timeout() -> None:
    rig = Rig()
    rig.workers.hold.set()
    running = asyncio.ensure_future(rig.lane.infer(REQ))
    await wait_for(lambda: len(rig.workers.waiting) == 1, 5, "the request at the worker")
    assert rig.lane.close(0.0) is False
    rig.workers.release()
    await running


def _sample(metric: str, model: str, suffix: str = "") -> float:
    value = REGISTRY.get_sample_value(metric + suffix, {"model": model})
    return 0.0 if value is None else value


async def test_requests_beyond_the_slots_show_as_queued_and_the_gauges_empty_when_they_end() -> None:
    rig = Rig(name="lane-slots", slots=2)
    assert _sample("moc_model_slots", "lane-slots") == 2
    rig.workers.hold.set()
    requests = [asyncio.ensure_future(rig.lane.infer(REQ)) for _ in range(3)]
    await wait_for(lambda: len(rig.workers.waiting) == 3, 5, "three requests at the worker")
    assert _sample("moc_model_slots_busy", "lane-slots") == 2
    assert _sample("moc_model_queue_depth", "lane-slots") == 1
    rig.workers.release()
    await asyncio.gather(*requests)
    assert _sample("moc_model_slots_busy", "lane-slots") == 0
    assert _sample("moc_model_queue_depth", "lane-slots") == 0


async def test_a_result_feeds_time_to_first_token_time_per_token_and_prompt_reuse() -> None:
    rig = Rig(name="lane-times")
    rig.workers.first_token_ms = 0.4  # the fake's latency is 1 ms for 3 tokens
    rig.workers.prompt_tokens_reused = 1
    await rig.lane.infer(REQ)
    ttft = "moc_inference_time_to_first_token_seconds"
    tpot = "moc_inference_time_per_output_token_seconds"
    assert _sample(ttft, "lane-times", "_count") == 1
    assert _sample(ttft, "lane-times", "_sum") == pytest.approx(0.0004)
    assert _sample(tpot, "lane-times", "_sum") == pytest.approx(0.0006 / 2)
    assert _sample("moc_inference_prompt_tokens_total", "lane-times") == 1
    assert _sample("moc_inference_prompt_tokens_reused_total", "lane-times") == 1


async def test_a_result_without_a_first_token_time_observes_no_token_times() -> None:
    rig = Rig(name="lane-no-times")  # a tensor model's worker reports none
    await rig.lane.infer(REQ)
    assert _sample("moc_inference_time_to_first_token_seconds", "lane-no-times", "_count") == 0
    assert _sample("moc_inference_prompt_tokens_total", "lane-no-times") == 1
