"""Peer RPC: how nodes forward requests to each other (ZMQ ROUTER server, DEALER clients).

`server` serves peers' requests here, `client` sends ours, `deadlines` times both; the frames
are `transports.peer_wire`'s.

The sockets speak ZMTP, ZeroMQ's wire protocol, from the event loop (transports/zmtp_sockets.py),
so a libzmq DEALER or ROUTER is still a peer; see that module for why not through libzmq.

A caller must hear from the peer within its `ack_timeout`, so it can tell "the peer is down"
(silence: try another holder) from "the peer is working on it". The request carries that
timeout; for an inference or an embedding the peer answers straight away when the answer is
ready within a fraction of it (one message, not an ack and then the answer: most forwarded
requests), and sends an ACK only when it is not; loads and placements are acknowledged at once. Streams send one
TOKEN frame per piece and end with RESULT or ERROR; a CANCEL stops the peer's generation. Frames
that fail authentication, are stale, malformed, sealed for another node (`misdirected`) or
replayed (a request id the server's replay window has taken before: `replay`) are counted and
dropped, never answered. A request whose connection breaks fails at once (PeerUnavailable): its
answer could not come back.
"""

from transports.peer.client import PeerAddress, PeerClient
from transports.peer.server import PeerHandler, PeerServer

__all__ = ["PeerAddress", "PeerClient", "PeerHandler", "PeerServer"]
