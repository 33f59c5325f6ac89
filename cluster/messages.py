"""Wire messages: frozen, slotted dataclasses; `cluster/codec.py` turns them into bytes.

Each message is sent as `[type, field1, field2, ...]` in declaration order, so adding a field
breaks the wire: add a new message type instead, or bump PROTOCOL_VERSION.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

__all__ = [
    "MESSAGE_CLASSES",
    "PROTOCOL_VERSION",
    "Ack",
    "Address",
    "Alive",
    "Dead",
    "IndirectPing",
    "LeaseReply",
    "LeaseRequest",
    "MemberState",
    "Message",
    "MessageType",
    "Nack",
    "Ping",
    "PushNodeState",
    "PushPull",
    "Suspect",
]

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change; a packet of another version is dropped and counted."""

Address = tuple[str, int]
"""(host, port) of a node's gossip socket."""


class MessageType(IntEnum):
    """Message type tags. Append only: these numbers are on the wire."""

    PING = 1
    INDIRECT_PING = 2
    ACK = 3
    NACK = 4
    SUSPECT = 5
    ALIVE = 6
    DEAD = 7
    PUSH_PULL = 8
    LEASE_REQUEST = 9
    LEASE_REPLY = 10


class MemberState(IntEnum):
    """A member's state as gossiped. Append only: these numbers are on the wire."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@dataclass(frozen=True, slots=True)
class Ping:
    """Ask `target` to ack `seq`; `target` guards against a new node on a reused address."""

    TYPE: ClassVar[MessageType] = MessageType.PING
    seq: int
    target: str
    source: str


@dataclass(frozen=True, slots=True)
class IndirectPing:
    """Ask the receiver to ping `target` for us and relay the ack (or a nack if `nack`)."""

    TYPE: ClassVar[MessageType] = MessageType.INDIRECT_PING
    seq: int
    target: str
    target_addr: Address
    nack: bool
    source: str


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer a ping (directly or relayed) with its sequence number."""

    TYPE: ClassVar[MessageType] = MessageType.ACK
    seq: int


@dataclass(frozen=True, slots=True)
class Nack:
    """An indirect prober's report that the target did not answer it in time."""

    TYPE: ClassVar[MessageType] = MessageType.NACK
    seq: int


@dataclass(frozen=True, slots=True)
class Suspect:
    """`accuser` suspects `node` at `incarnation`."""

    TYPE: ClassVar[MessageType] = MessageType.SUSPECT
    incarnation: int
    node: str
    accuser: str


@dataclass(frozen=True, slots=True)
class Alive:
    """`node` is alive at `incarnation`, reachable at `addr`, with opaque metadata."""

    TYPE: ClassVar[MessageType] = MessageType.ALIVE
    incarnation: int
    node: str
    addr: Address
    meta: bytes


@dataclass(frozen=True, slots=True)
class Dead:
    """`accuser` declares `node` dead; when accuser == node the node left gracefully."""

    TYPE: ClassVar[MessageType] = MessageType.DEAD
    incarnation: int
    node: str
    accuser: str


@dataclass(frozen=True, slots=True)
class PushNodeState:
    """One member's record inside a push-pull exchange."""

    name: str
    addr: Address
    incarnation: int
    state: int
    meta: bytes


@dataclass(frozen=True, slots=True)
class PushPull:
    """Full state of the sender; a request (`reply` false) is answered with the receiver's."""

    TYPE: ClassVar[MessageType] = MessageType.PUSH_PULL
    join: bool
    reply: bool
    source: str
    states: tuple[PushNodeState, ...]


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """`candidate` asks a voter for (or to renew) the primary lease of `term`."""

    TYPE: ClassVar[MessageType] = MessageType.LEASE_REQUEST
    term: int
    candidate: str
    seq: int


@dataclass(frozen=True, slots=True)
class LeaseReply:
    """A voter's answer; `term` is the highest term the voter has seen."""

    TYPE: ClassVar[MessageType] = MessageType.LEASE_REPLY
    term: int
    voter: str
    candidate: str
    seq: int
    granted: bool


Message = (
    Ping | IndirectPing | Ack | Nack | Suspect | Alive | Dead | PushPull | LeaseRequest | LeaseReply
)

MESSAGE_CLASSES: dict[MessageType, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Ping,
        IndirectPing,
        Ack,
        Nack,
        Suspect,
        Alive,
        Dead,
        PushPull,
        LeaseRequest,
        LeaseReply,
    )
}
