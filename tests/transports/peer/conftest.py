"""Fixtures of the peer RPC tests: a real PeerServer over the fake handler, and a raw requester."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.transports.peer.fakes import CLIENT, KEY, SERVER, FakePeerHandler, RawRequester
from transports.peer import PeerClient, PeerServer


@pytest.fixture
async def served() -> AsyncIterator[tuple[FakePeerHandler, PeerServer, PeerClient]]:
    handler = FakePeerHandler()
    server = PeerServer(handler, KEY, name=SERVER, host="127.0.0.1", port=0)
    await server.start()
    client = PeerClient(KEY, name=CLIENT, ack_timeout=2.0)
    yield handler, server, client
    client.close()
    await server.stop()


@pytest.fixture
async def raw(served: tuple[FakePeerHandler, PeerServer, PeerClient]) -> AsyncIterator[RawRequester]:
    requester = RawRequester(served[1].port)
    yield requester
    requester.sock.close(linger=0)

