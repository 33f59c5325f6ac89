"""API keys and what any client may be told (pure)."""

from __future__ import annotations

import pytest

from transports.auth import PATH_REFUSALS, KeyRing, client_error, public_health
from transports.errors import ErrorReply


def test_a_key_ring_accepts_its_keys_only() -> None:
    ring = KeyRing({"alpha", "beta"})
    assert ring
    assert ring.matches("alpha") and ring.matches("beta")
    assert not ring.matches("alph")
    assert not ring.matches("alpha ")
    assert not ring.matches("")


def test_an_empty_key_ring_is_false_and_matches_nothing() -> None:
    ring = KeyRing(())
    assert not ring
    assert not ring.matches("anything")


def test_a_key_with_a_lone_surrogate_is_refused_without_an_error() -> None:
    assert not KeyRing({"alpha"}).matches("al\ud800pha")


def test_the_public_health_keeps_statuses_and_drops_every_detail() -> None:
    view = {
        "status": "degraded",
        "timestamp": "2026-12-07T00:00:00+00:00",
        "components": {
            "state_store": {"status": "healthy", "detail": "/var/lib/moc-node/state.db"},
            "models": {"status": "degraded", "detail": "failing: a"},
        },
    }
    assert public_health(view) == {
        "status": "degraded",
        "timestamp": "2026-12-07T00:00:00+00:00",
        "components": {"state_store": {"status": "healthy"}, "models": {"status": "degraded"}},
    }


@pytest.mark.parametrize("code", sorted(PATH_REFUSALS))
def test_a_path_refusal_keeps_its_status_and_code_but_not_the_directories(code: str) -> None:
    err = ErrorReply(403, code, "x is outside the directories (/srv/models, /var/lib/moc-node)")
    safe = client_error(err)
    assert (safe.status, safe.code) == (403, code)
    assert "/srv" not in safe.message and "/var" not in safe.message


def test_other_errors_pass_unchanged() -> None:
    err = ErrorReply(404, "model_not_found", "model 'x' does not exist")
    assert client_error(err) is err
