"""Re-dialing a peer that restarted: the next request dials again at once and is answered.

A refused dial fails the request at once (PeerUnavailable) so the forwarder can try the next
holder; no retry loop holds a request for a dead peer. What must hold is that nothing stale
survives a restart: the broken connection is dropped and the next request opens a new one.
"""

from __future__ import annotations

import time

import pytest

from tests.transports.peer.fakes import CLIENT, KEY, SERVER, FakePeerHandler, at
from transports.peer import PeerClient, PeerServer
from transports.peer_wire import PeerUnavailable


async def test_a_peer_that_restarts_on_its_port_is_dialed_again_and_answers() -> None:
    server = PeerServer(FakePeerHandler(), KEY, name=SERVER, host="127.0.0.1", port=0)
    await server.start()
    peer = at(server)
    client = PeerClient(KEY, name=CLIENT, ack_timeout=5.0)
    try:
        assert await client.ping(peer) >= 0
        await server.stop()
        began = time.monotonic()
        with pytest.raises(PeerUnavailable):
            await client.ping(peer)  # down: refused at once, not after the ack timeout
        assert time.monotonic() - began < 1.0
        server = PeerServer(FakePeerHandler(), KEY, name=SERVER, host="127.0.0.1", port=server.port)
        await server.start()
        assert await client.ping(peer) >= 0
    finally:
        client.close()
        await server.stop()
