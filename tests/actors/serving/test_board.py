"""The board: what the manager published, readable from any thread without asking it."""

from __future__ import annotations

from actors.serving.board import ModelBoard
from actors.serving.config import CircuitBreakerConfig
from actors.serving.lane import ModelLane
from actors.serving.resilience import CircuitBreaker
from actors.types import ModelInfo


class Events:
    def model_used(self, name: str) -> None:
        pass

    def model_memory(self, name: str, mb: float) -> None:
        pass


def info(name: str, state: str) -> ModelInfo:
    return ModelInfo(name=name, backend="gguf", path=f"/{name}.gguf", state=state)  # type: ignore[arg-type]


def test_a_models_lane_is_served_only_while_it_is_loaded() -> None:
    board = ModelBoard()
    breaker = CircuitBreaker(CircuitBreakerConfig())
    lane = ModelLane("m", events=Events(), breaker=breaker)
    board.put(info("m", "loading"), breaker, lane)
    assert board.lane("m") is None
    board.put(info("m", "loaded"), breaker, lane)
    assert board.lane("m") is lane
    board.put(info("m", "unloading"), breaker, lane)
    assert board.lane("m") is None


def test_a_snapshot_lists_models_by_name_with_their_breakers_state_at_that_time() -> None:
    board = ModelBoard()
    breaker = CircuitBreaker(CircuitBreakerConfig(failure_threshold=1, reset_timeout=10.0))
    board.put(info("b", "loaded"), breaker)
    board.put(info("a", "failed"), None)
    breaker.record_failure(100.0)
    assert [(m.name, m.breaker) for m in board.snapshot(105.0)] == [("a", "closed"), ("b", "open")]
    assert [m.breaker for m in board.snapshot(110.0)] == ["closed", "half_open"]


def test_a_removed_model_is_gone_from_every_view() -> None:
    board = ModelBoard()
    board.put(info("m", "loaded"), None)
    board.remove("m")
    assert (board.get("m"), board.lane("m"), board.snapshot(0.0)) == (None, None, [])


def test_waiting_on_the_board_returns_once_the_published_state_holds() -> None:
    board = ModelBoard()
    board.put(info("m", "unloading"), None)
    assert board.wait_until(lambda models: models[0].state == "unloading", 0.0)
    assert not board.wait_until(lambda models: models[0].state == "available", 0.01)
