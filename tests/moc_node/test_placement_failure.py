"""What a client hears when the primary runs out of nodes to place a model on (a pure table)."""

from __future__ import annotations

import pytest

from actors.errors import InsufficientMemory, ModelNotFound
from moc_node.clustered.placement import placement_failure
from transports.peer_wire import PeerUnavailable

NOT_HERE = ModelNotFound("not in this node's catalog")
FULL = InsufficientMemory("no room")
GONE = PeerUnavailable("did not answer")


@pytest.mark.parametrize(
    ("failures", "expected", "says"),
    [
        ({"a": NOT_HERE, "b": NOT_HERE}, ModelNotFound, "not known to any node (asked: a, b)"),
        ({}, InsufficientMemory, "needs about 900 MiB"),
        ({"a": NOT_HERE, "b": FULL}, InsufficientMemory, "tried: a, b"),
        ({"a": NOT_HERE, "b": GONE}, PeerUnavailable, "b did not answer"),
        ({"a": GONE, "b": FULL}, InsufficientMemory, "tried: a, b"),
    ],
    ids=[
        "every-node-lacks-it",
        "fits-on-no-node",
        "one-lacks-it-one-is-full",
        "the-others-were-unreachable",
        "one-unreachable-one-full",
    ],
)
def test_the_error_says_why_no_node_took_the_model(
    failures: dict[str, Exception], expected: type[Exception], says: str
) -> None:
    error = placement_failure("m", 900, failures)
    assert type(error) is expected
    assert says in str(error)
